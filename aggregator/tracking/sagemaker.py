"""The SageMaker Experiments sink, through the real SDK (`sagemaker-core`, extra `fedsilo[aws]`).

The first delivery of a run opens it with `Run(...)` (the SDK creates or loads the experiment, its run group
and the run's trial component); each delivery enters the run's context, logs, and leaves it, which saves the
parameters and sends the metric points with BatchPutMetrics, raising on any error so the hub retries. The SDK
is blocking and keeps one current run per process: the hub calls this sink from a single thread of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from aggregator.tracking.config import SageMakerSinkConfig
from aggregator.tracking.sink import Param, RunRef

log = structlog.get_logger(__name__)
SESSION_TTL_S = 30 * 60.0  # assumed-role credentials last an hour; make a new session well before


class SageMakerSink:
    name = "sagemaker"

    def __init__(self, config: SageMakerSinkConfig) -> None:
        self._config = config
        self._session: Any = None
        self._session_at = 0.0
        self._run: Any = None
        # Runs opened by this process, by (experiment, run): reusing the SDK object saves the create/load calls
        # (and their throttling budget) on every delivery after the first.
        self._open: dict[tuple[str, str], Any] = {}
        self._key: tuple[str, str] = ("", "")

    def _sagemaker_session(self) -> Any:
        """Built on first use (and renewed), on the sink's thread: a missing SDK, region or credential is a
        delivery failure, retried like any other, never a start-up failure of the aggregator."""
        if self._session is not None and (
            self._config.role_arn is None or time.monotonic() - self._session_at < SESSION_TTL_S
        ):
            return self._session
        try:
            import boto3
            import botocore.config
            from sagemaker.core.helper.session_helper import Session
        except ImportError as exc:
            raise RuntimeError("the SageMaker sink needs the `aws` extra: pip install 'fedsilo[aws]'") from exc
        # The SDK configures stdlib logging at INFO on import and notes every config lookup: keep its warnings only.
        for name in ("sagemaker", "botocore", "boto3"):
            logging.getLogger(name).setLevel(logging.WARNING)
        c = self._config
        boto = boto3.Session(region_name=c.region)
        if c.role_arn is not None:
            creds = boto.client("sts").assume_role(RoleArn=c.role_arn, RoleSessionName="fedsilo-tracking")
            cr = creds["Credentials"]
            boto = boto3.Session(aws_access_key_id=cr["AccessKeyId"], aws_secret_access_key=cr["SecretAccessKey"],
                                 aws_session_token=cr["SessionToken"], region_name=c.region or boto.region_name)
        client_cfg = botocore.config.Config(
            retries={"mode": "standard", "max_attempts": c.max_attempts},
            connect_timeout=c.connect_timeout_s, read_timeout=c.read_timeout_s,
        )
        sdk_config = {"SchemaVersion": "1.0",
                      "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": not c.telemetry}}}}
        self._session = Session(
            boto_session=boto,
            sagemaker_client=boto.client("sagemaker", config=client_cfg),
            sagemaker_metrics_client=boto.client("sagemaker-metrics", config=client_cfg),
            sagemaker_config=sdk_config,
        )
        self._session_at = time.monotonic()
        log.info("sagemaker_session_ready", region=boto.region_name, assumed_role=c.role_arn is not None)
        return self._session

    def start_run(self, run: RunRef) -> None:
        from sagemaker.core.experiments.run import Run

        session = self._sagemaker_session()
        key = (run.experiment, run.name)
        r = self._open.get(key)
        if r is None:  # create (or, when it exists, load) once per process; later deliveries reuse the object
            r = Run(experiment_name=run.experiment, run_name=run.name, sagemaker_session=session,
                    experiment_display_name=run.experiment, tags=[{"Key": "fedsilo:job", "Value": run.job_id}],
                    artifact_bucket=self._config.artifact_bucket, artifact_prefix=self._config.artifact_prefix)
            self._open[key] = r
        self._key = key
        try:
            self._run = r.__enter__()
        except Exception as exc:  # entered the SDK's run context, then failed to save: leave it again
            try:
                r.__exit__(type(exc), exc, None)
            except Exception:
                log.debug("sagemaker_run_release_failed", exc_info=True)
            raise

    def log_parameters(self, params: Mapping[str, Param]) -> None:
        self._run.log_parameters(dict(params))

    def log_metric(self, name: str, value: float, step: int) -> None:
        self._run.log_metric(name=name, value=value, step=step)

    def log_artifact(self, name: str, path: Path) -> None:
        if self._config.artifact_bucket is None:
            return  # no bucket configured: artifacts stay in the local report
        self._run.log_file(str(path), name=name, is_output=True)

    def end_run(self, ok: bool, final_status: str | None = None) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        if ok:
            run.__exit__(None, None, None)  # saves the run and sends buffered metrics; raises on failure
            if final_status is not None:
                self._open.pop(self._key, None)
            return
        try:  # leave the SDK's run context so the retry can open the run again
            err = RuntimeError("delivery interrupted; fedsilo retries it")
            run.__exit__(RuntimeError, err, None)
        except Exception:
            log.debug("sagemaker_run_release_failed", exc_info=True)

    def flush(self) -> None:
        """Nothing to do: leaving a run's context (`end_run`) already saved it and sent its metrics."""
