"""AWS VPC Flow Logs: records, subscription envelopes, subnets, fragments and aggregates (pure)."""
