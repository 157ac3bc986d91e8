"""DataConfig: the `data` config group (conf/data/*.yaml), validated on construction."""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from floe.data.synthetic import SOURCES

NAMES = ("synthetic", "jsonl", "arctic_mix", "preference")
LOSS_ON = ("assistant", "all")  # data.loss_on: which tokens of a conversation are loss targets
EMBEDDED = ("synthetic", "arctic_mix")  # options that read the embedded sources
DEFAULT_EMBEDDED_EXAMPLES = 4000


@dataclass
class DataConfig:
    """What to train on and how to cut it into rows. Keys are `data.<field>` on the command line."""
    name: str = "synthetic"            # synthetic | jsonl | arctic_mix | preference (the data=<option>)
    paths: list[str] = field(default_factory=list)  # jsonl, preference: files or globs, one source each
    sources: list[str] = field(default_factory=lambda: list(SOURCES))  # embedded source names
    weights: list[float] | None = None  # share of each source (paths or sources); None: natural/equal
    num_examples: int | None = None    # examples in an epoch's mix; None: all (jsonl) or 4000 (embedded)
    seq_len: int = 256                 # tokens per packed row
    strict: bool = True                # stop at the first unusable line (else skip and count)
    overlong: str = "truncate"         # truncate | drop examples longer than seq_len
    tokenizer: str | None = None       # SentencePiece .model; None: floe's embedded tokenizer
    # A model's own Jinja chat template: a tokenizer_config.json (its chat_template) or a template file; None:
    # floe's ChatML. train.init_from sets it to the directory's when that is not floe's (floe/data/chat_template.py).
    chat_template: str | None = None
    cache_dir: str | None = None       # None: $FLOE_CACHE or ~/.cache/floe
    num_workers: int = 0               # tokenizer threads; 0: all cores
    # The held-out evaluation set (floe.data.build_eval_dataset), at most one of the two. eval_fraction:
    # for jsonl, the share of each source's examples held out of training (by content hash); for the
    # embedded sources, eval examples per source as a share of its training examples, drawn from the
    # held-out questions (which training never sees, whatever this is; moe/data/synthetic.py).
    eval_fraction: float = 0.0
    eval_paths: list[str] = field(default_factory=list)  # JSONL files or globs, one eval source each
    # How records are read (floe/data/layouts.py): the layout (auto: by each record's keys) and key mappings.
    format: str = "auto"               # auto | messages | sharegpt | alpaca | prompt_completion | text
    field_messages: str | None = None  # the key holding the message list (e.g. dialog)
    message_property_mappings: dict = field(default_factory=dict)  # {role: <key>, content: <key>} of a message
    roles: dict = field(default_factory=dict)    # {user: [human, person], ...}: extra role names in the data
    columns: dict = field(default_factory=dict)  # {prompt: question, completion: answer, ...}: flat key names
    # A Hugging Face dataset (datasets.load_dataset: a Hub name or a local dataset dir), one more source after paths.
    hf_dataset: str | None = None
    hf_config: str | None = None       # the dataset's config (subset) name
    hf_split: str = "train"
    # auto: stream (no local copy; the cache key is then the name) when the Hub's dataset card gives a download
    # larger than hf_stream_above_gb, else download into the Hub cache; true / false force one.
    hf_streaming: bool | str = "auto"
    hf_stream_above_gb: float = 10.0
    # assistant: loss on assistant turns only (completion-only); all: on every token of the conversation,
    # user turns and template markers included (a model that should write user questions: tools/magpie.py).
    # Preference pairs (data=preference) always train the answers only.
    loss_on: str = "assistant"

    def __post_init__(self):
        from floe.errors import field_type_errors

        if errors := field_type_errors(self, "data"):
            raise ValueError("invalid data config:\n  " + "\n  ".join(errors))
        # Hydra hands over ListConfig and friends; keep plain Python types.
        self.paths = [str(p) for p in (self.paths or [])]
        self.sources = [str(s) for s in (self.sources or [])]
        self.eval_paths = [str(p) for p in (self.eval_paths or [])]
        if self.weights is not None:
            self.weights = [float(w) for w in self.weights]
        problems = self._layout_problems()
        if self.name not in NAMES:
            problems.append(f"data.name must be one of {', '.join(NAMES)}, got {self.name!r}")
        embedded = self.name in EMBEDDED
        if self.name == "jsonl" and not self.paths and not self.hf_dataset:
            problems.append("data.paths must list at least one data file or glob for data=jsonl (or set data.hf_dataset)")
        if self.hf_streaming not in (True, False, "auto"):
            problems.append(f"data.hf_streaming must be true, false or auto, got {self.hf_streaming!r}")
        if not self.hf_stream_above_gb >= 0:
            problems.append(f"data.hf_stream_above_gb must be >= 0, got {self.hf_stream_above_gb}")
        if self.name == "preference" and not self.paths:
            problems.append("data.paths must list at least one JSONL file or glob for data=preference")
        if self.name == "preference" and self.hf_dataset:
            problems.append("data.hf_dataset is for data=jsonl; data=preference reads JSONL files in data.paths")
        if self.name == "preference" and (self.format != "auto" or self.field_messages or self.roles
                                          or self.message_property_mappings or self.columns):
            problems.append("data.format, data.field_messages, data.message_property_mappings, data.roles and "
                            "data.columns are for data=jsonl; data=preference reads TRL's prompt/chosen/rejected "
                            "layouts (moe/data/preference.py)")
        if embedded and (self.paths or self.hf_dataset):
            key = "data.paths" if self.paths else "data.hf_dataset"
            problems.append(f"{key} is for data=jsonl or data=preference; data={self.name} reads data.sources")
        if embedded:
            if not self.sources:
                problems.append("data.sources must name at least one embedded source")
            unknown = [s for s in self.sources if s not in SOURCES]
            if unknown:
                problems.append(f"data.sources: unknown {unknown}; known: {', '.join(SOURCES)}")
            if len(set(self.sources)) != len(self.sources):
                problems.append("data.sources lists a source twice")
        if self.weights is not None:
            n = len(self.source_names)
            what = "data.sources" if embedded else "data.paths" + (" + data.hf_dataset" if self.hf_dataset else "")
            if len(self.weights) != n:
                problems.append(f"data.weights has {len(self.weights)} entries but {what} has {n}")
            if any(not w > 0 for w in self.weights):  # also catches nan
                problems.append(f"data.weights must all be positive, got {self.weights}")
        if self.num_examples is not None and (not isinstance(self.num_examples, int) or self.num_examples < 1):
            problems.append(f"data.num_examples must be a positive integer or null, got {self.num_examples!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            problems.append(f"data.seq_len must be an integer >= 2, got {self.seq_len!r}")
        if self.overlong not in ("truncate", "drop"):
            problems.append(f"data.overlong must be 'truncate' or 'drop', got {self.overlong!r}")
        if not isinstance(self.strict, bool):
            problems.append(f"data.strict must be true or false, got {self.strict!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            problems.append(f"data.num_workers must be an integer >= 0, got {self.num_workers!r}")
        if isinstance(self.eval_fraction, int) and not isinstance(self.eval_fraction, bool):
            self.eval_fraction = float(self.eval_fraction)
        if not isinstance(self.eval_fraction, float) or not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"data.eval_fraction must be a number in [0, 1), got {self.eval_fraction!r}")
        elif self.eval_fraction > 0 and self.eval_paths:
            problems.append("data.eval_fraction and data.eval_paths both set: hold out a share of the training "
                            "sources OR evaluate on separate files, not both (set data.eval_fraction=0)")
        if self.loss_on not in LOSS_ON:
            problems.append(f"data.loss_on must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}")
        elif self.name == "preference" and self.loss_on != "assistant":
            problems.append("data.loss_on=all does not apply to data=preference: a pair trains its two answers "
                            "only (set data.loss_on=assistant)")
        if self.chat_template is not None:
            problems += self._chat_template_problems()
        if problems:
            raise ValueError("invalid data config:\n  " + "\n  ".join(problems))

    def _chat_template_problems(self) -> list[str]:
        from floe.data.chat_template import ChatTemplate

        if not os.path.isfile(self.chat_template):
            return [f"data.chat_template: no file {self.chat_template}"]
        try:
            ChatTemplate(self.chat_template)
        except Exception as e:  # a Jinja syntax error, a file without a template
            return [f"data.chat_template: {self.chat_template}: {e}"]
        return []

    def _layout_problems(self) -> list[str]:
        """Turn the mapping keys into plain dicts (Hydra hands over DictConfig) and check them."""
        from collections.abc import Mapping

        from floe.data.layouts import layout_errors

        problems = []
        for key in ("message_property_mappings", "roles", "columns"):
            value = getattr(self, key)
            if not isinstance(value, Mapping):
                problems.append(f"data.{key} must be a mapping, e.g. {{a: b}}, got {value!r}")
                setattr(self, key, {})
                continue
            value = {str(k): (v if isinstance(v, str) or not isinstance(v, Iterable) else [str(a) for a in v])
                     for k, v in value.items()}
            if key != "roles" and any(not isinstance(v, str) for v in value.values()):
                problems.append(f"data.{key} maps names to key names (strings), got {value!r}")
            setattr(self, key, value)
        return problems + layout_errors(self.layout())

    def layout(self):
        """The floe.data.layouts.Layout these keys describe."""
        from floe.data.layouts import Layout

        return Layout(self.format, self.field_messages, self.message_property_mappings, self.roles, self.columns)

    @property
    def hf_source(self) -> str | None:
        """The source name of data.hf_dataset ('hf:<name>'), or None."""
        return f"hf:{self.hf_dataset}" if self.hf_dataset else None

    @property
    def source_names(self) -> list[str]:
        """One name per source, in the order of data.weights (data.paths, then data.hf_dataset)."""
        if self.name in EMBEDDED:
            return list(self.sources)
        return list(self.paths) + ([self.hf_source] if self.hf_dataset else [])

    @property
    def has_eval(self) -> bool:
        """Whether a held-out evaluation set is configured (data.eval_fraction or data.eval_paths)."""
        return self.eval_fraction > 0 or bool(self.eval_paths)

    def cache_fields(self) -> dict:
        """The fields that change the built rows (the cache key); not where or how fast."""
        # tokenizer enters by content hash; eval_paths by file content, and only in the eval set's key
        skip = {"cache_dir", "num_workers", "tokenizer", "eval_paths", "chat_template"}  # the last: by content
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        if self.name not in EMBEDDED:
            out.pop("sources")
        return out
