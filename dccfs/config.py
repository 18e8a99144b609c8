"""The mount configuration: TOML file, defaults that need no file, and precise validation errors."""
from __future__ import annotations

import fnmatch
import json
import logging
import re
import tomllib
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

from dccfs.format import DEFAULT_CHUNK_SHIFT, MAX_CHUNK_SHIFT, MIN_CHUNK_SHIFT

log = logging.getLogger(__name__)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
CODEC_CHOICES = ("auto", "store", "zstd", "lz4", "tensor")
POLICY_CHOICES = ("lru", "arc", "s3fifo", "sieve", "wtinylfu")
WRITE_ADMIT_CHOICES = ("hot", "low", "bypass")


# Large tensor files are written and read sequentially: 1 MiB chunks wrote 30-45% and
# cold-read 25-75% faster than 256 KiB at the same ratio (mpnet fp32/bf16, 2026-11-29,
# docs/performance.md); everything else keeps 256 KiB, cheaper for random 4 KiB reads.
TENSOR_FILE_GLOBS = ("*.safetensors", "*.pt", "*.pth", "*.bin", "*.ckpt", "*.npy", "*.gguf")
TENSOR_CHUNK_SIZE = 1 << 20


def toml_text(value) -> str:
    """A config value as the TOML file spells it (true, "512MiB"), for error messages."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the file, key and reason."""


def parse_size(value, where: str = "size") -> int:
    """'8G', '512MiB', '64k', 1048576 -> bytes. K/M/G are binary (1024-based) as in df -h."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a size like 512MiB, got {toml_text(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{where}: size must not be negative, got {toml_text(value)}")
        if value >= 1 << 63:
            raise ConfigError(f"{where}: {toml_text(value)} is too large (at most 8 EiB)")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a size like 512MiB, got {toml_text(value)}")
    m = _SIZE_RE.match(value)
    if not m:
        raise ConfigError(f"{where}: {toml_text(value)} is not a size (examples: 8G, 512MiB, 64k, 1048576)")
    number, unit, suffix = m.groups()
    if not unit and suffix.lower() not in ("", "b"):
        raise ConfigError(f"{where}: {toml_text(value)} is not a size ('{suffix}' needs a unit: KiB, MiB, GiB)")
    size = Fraction(number) * 1024 ** _UNITS[unit.lower()]  # exact: a float rounded huge sizes silently
    if size.denominator != 1:
        raise ConfigError(f"{where}: {toml_text(value)} is not a whole number of bytes")
    if size >= 1 << 63:
        raise ConfigError(f"{where}: {toml_text(value)} is too large (at most 8 EiB)")
    return int(size)


@dataclass(frozen=True)
class Rule:
    """Files whose path (relative to the mount root) matches glob get this codec and chunk size."""
    glob: str
    codec: str = "auto"
    level: int | None = None
    chunk_size: int | None = None
    delta: bool | None = None  # None: on for recognised checkpoint layouts (config `delta`)
    read_block_size: int | None = None  # None: the config's `read_block_size`

    def matches(self, relpath: str) -> bool:
        return fnmatch.fnmatchcase(relpath, self.glob) or fnmatch.fnmatchcase(
            relpath.rsplit("/", 1)[-1], self.glob)


@dataclass(frozen=True)
class CacheConfig:
    # W-TinyLFU: best byte hit ratio in all 16 replay cells and scan resistant
    # (docs/policies.md). 1 GiB of hot chunks keeps a few models' hot set on a
    # 24 GiB node without competing with the page cache.
    policy: str = "wtinylfu"
    t0_bytes: int = 1 << 30
    dirty_bytes: int = 256 << 20
    readahead_chunks: int = 8
    write_admit: str = "hot"


@dataclass(frozen=True)
class Config:
    cache: CacheConfig = field(default_factory=CacheConfig)
    rules: tuple[Rule, ...] = ()
    chunk_size: int = 1 << DEFAULT_CHUNK_SHIFT
    sync_on_close: bool = True
    # The kernel's FUSE writeback cache (never with shared); docs/performance.md.
    writeback_cache: bool = True
    shared: bool = False
    # Store a new checkpoint as a delta of the previous one of its series (docs/delta.md).
    delta: bool = True
    # Longest chain of deltas a new chunk may start (1: every delta refers to a keyframe).
    delta_chain: int = 1
    # False: checkpoints are written as keyframes at full speed and stored as deltas by a
    # background pass after their last close (dccfs/redelta.py). That pass also catches up
    # on the chunks a busy writer left as keyframes when this is true.
    delta_during_write: bool = True
    # When a delta base's last name goes (a rotating run deletes the oldest checkpoint) and
    # one file alone still needs it, that file is stored again in the background (a delta of
    # the newest checkpoint of its series, or keyframes) and the base's space is freed
    # (dccfs/unpin.py); false keeps the base pinned instead.
    delta_unpin_rewrite: bool = True
    # Tensor chunks larger than this are stored as blocks of this size that a small read decodes alone
    # (codec 3, docs/codecs.md); 0 (the default) stores every chunk whole. 128 KiB blocks cost about 0.001 of
    # ratio and took cold 4 KiB random reads from 0.24x to 0.42x the passthrough, but two encoder threads hand
    # the GIL to each other between a block's kernels, and checkpoint writes fell as low as 0.5x (docs/
    # performance.md, "2026-12-07: read blocks"): for files read at random (mmap'ed weights served for
    # inference), not for checkpoints.
    read_block_size: int = 0
    # Load the codec kernels on a background thread at mount (seconds of one core) rather than under
    # the first reads and writes that need them; false: each loads on its first use, and a mount
    # that reads or writes little spends only what it uses (short-lived mounts, scripts, tests).
    warm_up: bool = True
    source: str = "<defaults>"

    def rule_for(self, relpath: str) -> Rule:
        for rule in self.rules:
            if rule.matches(relpath):
                return rule
        if self.chunk_size == 1 << DEFAULT_CHUNK_SHIFT:
            name = relpath.rsplit("/", 1)[-1]
            # Savers that write a temporary and rename it (safetensors, transformers,
            # most trainers) are saving checkpoints.
            if name.startswith(".tmp") or name.endswith(".tmp"):
                return Rule(name, chunk_size=TENSOR_CHUNK_SIZE)
            for glob in TENSOR_FILE_GLOBS:
                if fnmatch.fnmatchcase(name, glob):
                    return Rule(glob, chunk_size=TENSOR_CHUNK_SIZE)
        return Rule("*")

    def chunk_shift_for(self, relpath: str) -> int:
        size = self.rule_for(relpath).chunk_size or self.chunk_size
        return size.bit_length() - 1

    @property
    def smallest_chunk(self) -> int:
        """The smallest chunk size any file of this mount can have (tensor files' are larger)."""
        return min([self.chunk_size] + [r.chunk_size for r in self.rules if r.chunk_size])

    def check_t0_fits(self, where: str) -> None:
        """ConfigError for a T0 budget that is on but smaller than every chunk: it would hold nothing."""
        t0, chunk = self.cache.t0_bytes, self.smallest_chunk
        if 0 < t0 < chunk:
            size = f"{chunk >> 20}MiB" if chunk % (1 << 20) == 0 else f"{chunk >> 10}KiB"
            raise ConfigError(f"{where}: {t0} bytes is less than one chunk ({size}), so T0 would hold "
                              f"nothing; use 0 to turn T0 off, or at least {size}")

    def check_budgets_fit(self, where: str, memory: tuple[int, str] | None) -> None:
        """ConfigError for budgets (t0_bytes + dirty_bytes) past the memory the daemon can have
        (memory: its size and what sets it, from dccfs.memory.memory_limit; None: unknown). The
        daemon would be killed for memory, or would swap, long before its cache filled."""
        if memory is None:
            return
        limit, what = memory
        budgets = self.cache.t0_bytes + self.cache.dirty_bytes
        if budgets > limit:
            raise ConfigError(f"{where}: t0_bytes + dirty_bytes = {budgets >> 20} MiB is more than {what} "
                              f"({limit >> 20} MiB): the daemon would run out of memory before its cache "
                              "filled; lower t0_bytes")

    def with_cache(self, **changes) -> "Config":
        return replace(self, cache=replace(self.cache, **changes))


_TOP_KEYS = {"cache", "rule", "chunk_size", "sync_on_close", "shared", "delta", "delta_chain",
             "delta_during_write", "delta_unpin_rewrite", "writeback_cache", "read_block_size", "warm_up"}
_CACHE_KEYS = {"policy", "t0_bytes", "dirty_bytes", "readahead_chunks", "write_admit"}
_RULE_KEYS = {"glob", "codec", "level", "chunk_size", "delta", "read_block_size"}


def _check_keys(table: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {toml_text(unknown[0])} (valid keys: {', '.join(sorted(allowed))})")


def check_chunk_size(value, where: str) -> int:
    size = parse_size(value, where)
    if size & (size - 1) or not (1 << MIN_CHUNK_SHIFT) <= size <= (1 << MAX_CHUNK_SHIFT):
        raise ConfigError(f"{where}: chunk size must be a power of two from 64KiB to 64MiB, got {toml_text(value)}")
    return size


def check_read_block_size(value, where: str) -> int:
    size = parse_size(value, where)
    if size and (size & (size - 1) or not 4 << 10 <= size <= 32 << 20):
        raise ConfigError(f"{where}: must be 0 (off) or a power of two from 4KiB to 32MiB, got {toml_text(value)}")
    return size


def check_cache_value(key: str, value, where: str, from_text: bool = False):
    """Validate one [cache] key; shared by the config file and `dccfs tune`, whose values arrive as
    text (from_text: "8" is a number there, while a config file spells numbers without quotes)."""
    if key == "policy":
        if value not in POLICY_CHOICES:
            raise ConfigError(f"{where}: policy {toml_text(value)} is not one of {', '.join(POLICY_CHOICES)}")
        return value
    if key in ("t0_bytes", "dirty_bytes"):
        size = parse_size(value, where)
        if key == "dirty_bytes" and size < (4 << 20):
            raise ConfigError(f"{where}: dirty_bytes must be at least 4MiB, got {toml_text(value)}")
        return size
    if key == "readahead_chunks":
        if from_text and isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 256:
            raise ConfigError(f"{where}: readahead_chunks must be an integer 0..256, got {toml_text(value)}")
        return value
    if key == "write_admit":
        if value not in WRITE_ADMIT_CHOICES:
            raise ConfigError(f"{where}: write_admit must be one of {', '.join(WRITE_ADMIT_CHOICES)}")
        return value
    raise ConfigError(f"{where}: unknown key {toml_text(key)} (valid keys: {', '.join(sorted(_CACHE_KEYS))})")


def _check_brackets(glob: str, where: str) -> None:
    """ConfigError for a '[' that fnmatch would match literally (never closed) or a ']' outside a set:
    both are typos far more often than file names, and the rule would then quietly match nothing."""
    i = 0
    while i < len(glob):
        if glob[i] == "[":
            # As fnmatch reads a set: an optional '!', then a ']' right at the start is a member.
            first = i + 1 + (glob[i + 1:i + 2] == "!")
            close = glob.find("]", first + (glob[first:first + 1] == "]"))
            if close < 0:
                raise ConfigError(f"{where}: glob {toml_text(glob)} has unbalanced brackets: the '[' at "
                                  f"position {i} is never closed")
            members = glob[first:close]
            for k in range(1, len(members) - 1):
                if members[k] == "-" and members[k - 1] > members[k + 1]:
                    raise ConfigError(f"{where}: glob {toml_text(glob)} has the empty range "
                                      f"'{members[k - 1]}-{members[k + 1]}' (write it low to high)")
            i = close + 1
        elif glob[i] == "]":
            raise ConfigError(f"{where}: glob {toml_text(glob)} has unbalanced brackets: the ']' at position "
                              f"{i} closes no '[' (a literal ']' is written '[]]')")
        else:
            i += 1


def _parse_rule(table, where: str) -> Rule:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    _check_keys(table, _RULE_KEYS, where)
    glob = table.get("glob")
    if not isinstance(glob, str) or not glob:
        raise ConfigError(f"{where}: 'glob' is required and must be a non-empty string")
    _check_brackets(glob, where)
    codec = table.get("codec", "auto")
    if codec not in CODEC_CHOICES:
        raise ConfigError(f"{where}: codec {toml_text(codec)} is not one of {', '.join(CODEC_CHOICES)}")
    level = table.get("level")
    if level is not None and (isinstance(level, bool) or not isinstance(level, int) or not -7 <= level <= 22):
        raise ConfigError(f"{where}: level must be an integer -7..22, got {toml_text(level)}")
    chunk = table.get("chunk_size")
    chunk_size = check_chunk_size(chunk, f"{where}.chunk_size") if chunk is not None else None
    delta = table.get("delta")
    if delta is not None and not isinstance(delta, bool):
        raise ConfigError(f"{where}: delta must be true or false, got {toml_text(delta)}")
    blocks = table.get("read_block_size")
    read_block_size = check_read_block_size(blocks, f"{where}.read_block_size") if blocks is not None else None
    return Rule(glob, codec, level, chunk_size, delta, read_block_size)


def parse_config(data: dict, source: str) -> Config:
    _check_keys(data, _TOP_KEYS, source)
    cache_table = data.get("cache", {})
    if not isinstance(cache_table, dict):
        raise ConfigError(f"{source}: [cache] must be a table")
    cache = {k: check_cache_value(k, v, f"{source}: cache.{k}") for k, v in cache_table.items()}
    rules_raw = data.get("rule", [])
    if not isinstance(rules_raw, list):
        raise ConfigError(f"{source}: rules are written as [[rule]] tables")
    rules = tuple(_parse_rule(r, f"{source}: rule #{i + 1}") for i, r in enumerate(rules_raw))
    top = {}
    if "chunk_size" in data:
        top["chunk_size"] = check_chunk_size(data["chunk_size"], f"{source}: chunk_size")
    for key in ("sync_on_close", "shared", "delta", "delta_during_write", "delta_unpin_rewrite",
                "writeback_cache", "warm_up"):
        if key in data:
            if not isinstance(data[key], bool):
                raise ConfigError(f"{source}: {key} must be true or false")
            top[key] = data[key]
    if "read_block_size" in data:
        top["read_block_size"] = check_read_block_size(data["read_block_size"], f"{source}: read_block_size")
    if "delta_chain" in data:
        chain = data["delta_chain"]
        if not isinstance(chain, int) or isinstance(chain, bool) or not 1 <= chain <= 16:
            raise ConfigError(f"{source}: delta_chain must be an integer 1..16, got {toml_text(chain)}")
        top["delta_chain"] = chain
    config = Config(cache=CacheConfig(**cache), rules=rules, source=source, **top)
    config.check_t0_fits(f"{source}: cache.t0_bytes")
    return config


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text (byte {exc.start})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_config(data, str(path))
