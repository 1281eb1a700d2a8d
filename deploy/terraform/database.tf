# The aggregator's state store: RDS PostgreSQL, shared by its replicas (each job has one writer at a time: a lease
# per job with a fencing token, aggregator/leases.py). In the VPC's database subnets, never public, reachable only
# from the aggregator cluster's nodes (its pods use their addresses), TLS only, encrypted with a key of its own.
#
# The password is generated here and handed to the pods in a Kubernetes Secret (the URL, key `url`) that the chart
# reads at start-up (database.existingSecret); it is never a Helm value. It is in Terraform's state, so keep the
# state in an encrypted backend. Why not manage_master_user_password: RDS then rotates the password in Secrets
# Manager (every 7 days by default), and the aggregator reads its URL once, when a pod starts.

resource "aws_kms_key" "database" {
  description             = "${var.name}: encrypts the aggregator's database, its snapshots and Performance Insights"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms_account_admin.json
}

resource "aws_kms_alias" "database" {
  name          = "alias/${var.name}-database"
  target_key_id = aws_kms_key.database.key_id
}

# Letters, digits and URL-safe punctuation only: the password goes into a postgresql:// URL as it is.
resource "random_password" "database" {
  length           = 40
  special          = true
  override_special = "-_~"
}

resource "aws_security_group" "database" {
  name_prefix = "${var.name}-aggregator-db-"
  description = "fedsilo aggregator database: PostgreSQL from the aggregator cluster's nodes and pods only"
  vpc_id      = module.aggregator_vpc.vpc_id
  # No egress rule: the database opens no connection.

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "database_from_nodes" {
  security_group_id            = aws_security_group.database.id
  description                  = "PostgreSQL from the aggregator cluster's nodes (VPC CNI pods use their addresses)"
  referenced_security_group_id = module.aggregator_eks.node_security_group_id
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
}

resource "aws_db_parameter_group" "database" {
  name_prefix = "${var.name}-aggregator-"
  description = "fedsilo aggregator: TLS only, slow statements and schema changes logged"
  family      = "postgres${split(".", var.database_engine_version)[0]}"

  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }
  parameter {
    name  = "log_min_duration_statement"
    value = "1000"
  }
  parameter {
    name  = "log_statement"
    value = "ddl"
  }

  lifecycle {
    create_before_destroy = true
  }
}

data "aws_iam_policy_document" "database_monitoring_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["monitoring.rds.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "database_monitoring" {
  name_prefix        = "${var.name}-db-monitoring-"
  description        = "RDS enhanced monitoring of the fedsilo aggregator's database"
  assume_role_policy = data.aws_iam_policy_document.database_monitoring_assume.json
}

resource "aws_iam_role_policy_attachment" "database_monitoring" {
  role       = aws_iam_role.database_monitoring.name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

resource "aws_db_instance" "aggregator" {
  #checkov:skip=CKV_AWS_161:The aggregator authenticates with a password from a Kubernetes Secret; IAM tokens last 15 minutes and its connection URL cannot renew them.
  identifier_prefix = "${var.name}-aggregator-"
  engine            = "postgres"
  engine_version    = var.database_engine_version
  instance_class    = var.database_instance_class
  db_name           = "fedsilo"
  username          = "fedsilo"
  password          = random_password.database.result
  port              = 5432

  allocated_storage     = var.database_storage_gb
  max_allocated_storage = var.database_max_storage_gb
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = aws_kms_key.database.arn

  db_subnet_group_name   = module.aggregator_vpc.database_subnet_group_name
  vpc_security_group_ids = [aws_security_group.database.id]
  publicly_accessible    = false
  multi_az               = var.database_multi_az
  parameter_group_name   = aws_db_parameter_group.database.name
  ca_cert_identifier     = "rds-ca-rsa2048-g1"

  backup_retention_period   = var.database_backup_retention_days
  backup_window             = "02:00-03:00"
  maintenance_window        = "sun:03:30-sun:04:30"
  copy_tags_to_snapshot     = true
  deletion_protection       = var.database_deletion_protection
  skip_final_snapshot       = false
  final_snapshot_identifier = "${var.name}-aggregator-final"

  auto_minor_version_upgrade            = true
  enabled_cloudwatch_logs_exports       = ["postgresql", "upgrade"]
  monitoring_interval                   = 60
  monitoring_role_arn                   = aws_iam_role.database_monitoring.arn
  performance_insights_enabled          = true
  performance_insights_kms_key_id       = aws_kms_key.database.arn
  performance_insights_retention_period = 7

  depends_on = [aws_iam_role_policy_attachment.database_monitoring]
}

# The Secret the chart reads (database.existingSecret, key url): created with the namespace, before the release.
resource "kubernetes_namespace_v1" "fedsilo" {
  metadata {
    name = "fedsilo"
  }
}

resource "kubernetes_secret_v1" "database" {
  metadata {
    name      = "fedsilo-postgres"
    namespace = kubernetes_namespace_v1.fedsilo.metadata[0].name
  }
  data = {
    url = "postgresql://fedsilo:${urlencode(random_password.database.result)}@${aws_db_instance.aggregator.address}:${aws_db_instance.aggregator.port}/fedsilo?sslmode=require"
  }
}
