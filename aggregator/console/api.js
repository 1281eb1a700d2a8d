// The console's only way to the aggregator: the REST API, with the operator's bearer token (kept in this
// tab's sessionStorage only) or, without a token, the browser's operator client certificate.
const KEY = "fedsilo.token";

export class ApiError extends Error {
  constructor(status, code, detail, errors) {
    super(detail);
    this.status = status;
    this.code = code;
    this.errors = errors || [];
  }
}

export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

export async function api(path, { method = "GET", body, type = "application/json" } = {}) {
  const headers = { Accept: "application/json" };
  const bearer = token.get();
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  if (body !== undefined) headers["Content-Type"] = type;
  let response;
  try {
    response = await fetch(path, { method, headers, body, cache: "no-store", credentials: "same-origin" });
  } catch (err) {
    throw new ApiError(0, "unreachable", `the aggregator did not answer (${err.message})`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const detail = (data && data.detail) || text.slice(0, 300) || response.statusText;
    throw new ApiError(response.status, (data && data.error) || "http_error", detail, data && data.errors);
  }
  return data;
}

// A sentence an operator can act on, for any failed call.
export function explain(err) {
  if (!(err instanceof ApiError)) return `Unexpected error: ${err.message}`;
  if (err.status === 401) return `Not signed in (401): ${err.message}. Sign in with an operator token.`;
  if (err.status === 403) return `Not allowed (403): ${err.message}.`;
  if (err.status === 0) return `Cannot reach the aggregator: ${err.message}.`;
  return `HTTP ${err.status} ${err.code}: ${err.message}`;
}
