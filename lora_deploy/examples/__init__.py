"""Built-in example models and adapters (`models`) and the end-to-end demo (`demo`)."""
