"""Model knowledge: tasks and inputs from a config (`tasks`, no torch), deterministic
sample inputs (`samples`), Hugging Face loading (`hf`) and the unmerged reference that
runs base + adapter on any torch module (`unmerged`)."""
