"""Live statistics: sliding SDT windows and drift tests, and their export to Prometheus."""
