"""Smart scheduling across replicas: routing policies, an OpenAI-compatible proxy, an autoscaler."""
