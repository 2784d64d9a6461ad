"""Specialization: `edge-agent model specialize`. From a route and labelled readings (a JSONL
file or a labelling rule) it trains a small llama-architecture student with PyTorch (from
scratch, or with --from-base by fine-tuning a pretrained llama GGUF with LoRA), exports it
to GGUF, quantizes it with llama.cpp's own quantizer and evaluates every file through llama.cpp
on a held-out set before anything ships.

An offline tool with its own optional dependencies (the `[train]` extra: torch, gguf, numpy),
never part of the daemon's runtime: nothing below imports it. Only agent/specialize/student.py
and finetune.py import torch, only export.py and pretrained.py import gguf, and only
agent/specialize/llamacpp.py imports llama_cpp. Sits beside app, above flows and ota: may
import every package below it (base, config, routing, inference, flows ...); only cli imports
it, lazily.
"""
