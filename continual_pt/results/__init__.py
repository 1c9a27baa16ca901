"""What runs leave behind, read and shown: metrics sinks, curves, the report table, figures."""
