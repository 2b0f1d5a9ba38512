"""Prometheus exporter for Zilliz Cloud and Milvus bulk-import jobs."""

__version__ = "0.1.0"
