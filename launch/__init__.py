"""How a run is started: local Ray (the embedded default), an existing Ray cluster, or a KubeRay job."""
