"""Framework integrations, each imported only when a model of that framework is logged."""
