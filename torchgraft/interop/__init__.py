"""torchgraft.interop: the Hugging Face layout, both directions (see docs/huggingface.md).

`hf.py` (load_hf / save_hf engine), `hf_gpt2.py` / `hf_llama.py` / `hf_bert.py` (per-family config
translation and tensor-name tables), `safetensors_io.py` (lazy reader, streaming sharded writer),
`convert.py` (`torchgraft convert`). Nothing is imported here, so `import torchgraft` stays light.
"""
