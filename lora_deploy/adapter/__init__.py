"""Adapter: read PEFT adapters (`read`), the registry of LoRA variants and config keys
(`variants`), fit an adapter to a base checkpoint (`plan`), and summarise it (`summary`)."""

from lora_deploy.adapter.read import Adapter, LoraModule, load_adapter

__all__ = ["Adapter", "LoraModule", "load_adapter"]
