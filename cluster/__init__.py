"""Where processes run and how they are watched: the Ray session, Prometheus metrics, `gfnlm submit`, KubeRay manifests, the Grafana dashboard, the image."""
