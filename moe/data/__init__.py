"""floe's data pipeline: records -> ChatML tokens with completion-only labels -> packed rows -> steps.

    from floe.data import DataConfig, build_dataset, StepLoader
    tokenizer, dataset = build_dataset(DataConfig(**cfg.data), seed)
    loader = StepLoader(dataset, global_batch_size=G, micro_batch_size=m, dp_rank=r, dp_size=n, seed=seed)
    for micro in loader.next_step(): ...

Each micro-batch is a dict of [micro, seq_len] tensors:
    input_ids       long  token ids; pad_id in the padding tail of a row
    labels          long  = input_ids where the token is trained, else -100 (aligned with input_ids:
                          the model predicts labels[:, t+1] from position t); -100 on the first token
                          of every example, on prompts, on template markers and on padding
    position_ids    long  restart at 0 at every packed example and at the padding tail, so the
                          model can find the example boundaries from the restarts
    attention_mask  bool  False on padding (kept out of the loss, attention and router statistics)
    example_ids     long  only with StepLoader(..., with_example_ids=True): the mixture index of each
                          token's example, -1 on padding (data=preference: 2p chosen, 2p + 1 rejected
                          of pair p, side by side in one row; moe/data/preference.py)

Held-out evaluation (data.eval_fraction or data.eval_paths) and the resume/size checks:
    eval_ds = build_eval_dataset(DataConfig(**cfg.data), seed)      # None when no eval is configured
    for mb in eval_micro_batches(eval_ds, micro_batch_size=m, dp_rank=r, dp_size=n): ...
        # mb has the keys above plus source_ids [micro, seq_len] (index into eval_ds.source_names,
        # -1 on padding); eval_ds.source_labels are the short names for eval_loss/<label>
    check_enough_rows(dataset, global_batch_size)   # ValueError with the numbers and the fix
    dataset.fingerprint                             # sha256 of the packed arrays, for resume checks
"""
from floe.data.config import DataConfig
from floe.data.dataset import PackedDataset, build_dataset, build_eval_dataset, path_errors
from floe.data.loader import StepLoader, check_enough_rows, eval_micro_batches
from floe.data.tokenizer import Tokenizer

__all__ = ["DataConfig", "PackedDataset", "StepLoader", "Tokenizer", "build_dataset", "build_eval_dataset",
           "check_enough_rows", "eval_micro_batches", "path_errors"]
