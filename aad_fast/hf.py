"""Where users import Hugging Face interop from (``aad_fast.hf.AADLogitsProcessor``, ``load_pair``):
the loading code lives in ``aad_fast.model.loading``, the processor in ``aad_fast.processor``."""
from .model.loading import (check_device, check_dir, check_dtype, check_same_tokenizer,
                            is_adapter_dir, is_peft_model, load_adapter, load_causal_lm, load_pair,
                            load_tokenizer, resolve_tokenizer)
from .processor import AADLogitsProcessor  # noqa: F401
