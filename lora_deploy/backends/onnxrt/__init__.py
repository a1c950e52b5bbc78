"""ONNX Runtime: the session loader, the runner, the LoRA adapter format and adapter sessions."""
