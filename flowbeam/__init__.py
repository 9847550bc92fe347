"""flowbeam: network traffic to flow records, with Apache Beam."""

__version__ = "0.1.0"
