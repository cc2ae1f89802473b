"""Every file the workbench reads is checked before it is trusted: damaged weights and traces are refused with the
file's name, the tensor, and what to do. The real loading code on real files (copies of gpt-oss-nano)."""
import json
import logging
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import workbench as wb
from workbench import fixtures
from workbench.errors import TraceFileError, WeightsFileError


@pytest.fixture
def nano_copy(tmp_path):
    folder = tmp_path / "nano"
    shutil.copytree(fixtures.nano_path(), folder)
    return folder


def _header(file) -> tuple[int, dict]:
    """(header length, header) of a safetensors file."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return length, json.loads(f.read(length))


def _overwrite(file, offset: int, data: bytes) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _tensors_at(file, start: int, stop: int) -> list[str]:
    """Names of the tensors whose bytes overlap [start, stop) of the file."""
    length, header = _header(file)
    base = 8 + length
    return [k for k, v in header.items() if k != "__metadata__"
            and base + v["data_offsets"][0] < stop and base + v["data_offsets"][1] > start]


def _noise(n: int = 65536, seed: int = 0) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator).numpy().tobytes()


# ---- weights ---------------------------------------------------------------------------------------------------
def test_random_bytes_in_the_weights_are_refused_naming_file_and_parameter(nano_copy):
    file = nano_copy / "model.safetensors"
    length, _ = _header(file)
    data_start = 8 + length
    middle = data_start + (file.stat().st_size - data_start) // 2
    _overwrite(file, middle, _noise())
    hit = _tensors_at(file, middle, middle + 65536)
    with safe_open(str(file), "pt") as f:  # the damage is there: random bf16 bits hold NaN/inf
        damaged = [k for k in hit if not torch.isfinite(f.get_tensor(k).float()).all()]
    assert damaged, hit

    with pytest.raises(WeightsFileError) as e:
        wb.load(str(nano_copy), preset="cpu")
    message = str(e.value)
    assert str(file) in message and damaged[0] in message, message
    assert "NaN or inf" in message and "huggingface-cli download" in message


def test_a_truncated_weights_file_is_refused_naming_it(nano_copy):
    file = nano_copy / "model.safetensors"
    os.truncate(file, file.stat().st_size - 4096)
    with pytest.raises(WeightsFileError, match="truncated") as e:
        wb.load(str(nano_copy), preset="cpu")
    assert str(file) in str(e.value) and "4,096 missing" in str(e.value)


@pytest.mark.parametrize("where", ["json", "length"])
def test_a_garbled_header_is_refused_naming_the_file(nano_copy, where):
    file = nano_copy / "model.safetensors"
    if where == "json":
        _overwrite(file, 8 + 40, b"\x00garbled\x00")
    else:  # the 8-byte header length itself
        _overwrite(file, 0, _noise(8, seed=1))
    with pytest.raises(WeightsFileError, match="is damaged") as e:
        wb.load(str(nano_copy), preset="cpu")
    assert str(file) in str(e.value) and "Nothing was loaded" in str(e.value)


def test_what_transformers_refuses_is_reported_naming_the_file(nano_copy):
    # A header that parses and is long enough, but names a dtype safetensors does not know: safetensors' own error,
    # which names no file, comes back as a WeightsFileError that does.
    file = nano_copy / "model.safetensors"
    length, _ = _header(file)
    with open(file, "rb") as f:
        head = f.read(8 + length)
    _overwrite(file, 0, head.replace(b'"BF16"', b'"XF16"', 1))
    with pytest.raises(WeightsFileError) as e:
        wb.load(str(nano_copy), preset="cpu")
    assert str(file) in str(e.value) and "SafetensorError" in str(e.value)


def test_a_hub_model_in_the_cache_is_checked_and_a_damaged_file_names_the_download(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--acme--nano"
    shutil.copytree(fixtures.nano_path(), repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    s = wb.load("acme/nano", preset="cpu")
    assert s.report.weights_check.files == 1 and s.report.weights_check.tensors == 71

    file = repo / "snapshots" / "abc123" / "model.safetensors"
    os.truncate(file, file.stat().st_size - 10)
    with pytest.raises(WeightsFileError, match="truncated") as e:
        wb.load("acme/nano", preset="cpu")
    assert str(file) in str(e.value) and "huggingface-cli download acme/nano --force-download" in str(e.value)


def test_an_intact_copy_loads_and_the_report_says_what_was_checked(nano_copy):
    s = wb.load(str(nano_copy), preset="cpu")
    check = s.report.weights_check
    _, header = _header(nano_copy / "model.safetensors")
    stored = {k: v for k, v in header.items() if k != "__metadata__"}
    assert check.files == 1 and check.tensors == len(stored)
    assert check.values == sum(torch.Size(v["shape"]).numel() for v in stored.values())
    assert 0 < check.seconds < 30
    assert "weights check" in str(s.report) and "all finite" in str(s.report)
    skipped = wb.load(str(nano_copy), preset="cpu", check_weights=False).report
    assert "not checked (check_weights=False)" in str(skipped)


def test_giving_back_the_scanned_embedding_pages_loses_nothing(tmp_path, tiny_checkpoint):
    """The scan hands the input embedding's pages back to the kernel (a forward reads only its rows): values in
    anonymous memory and in a memory-mapped file read back unchanged, and a checked load computes what an unchecked
    one does, bit for bit."""
    from workbench.model import integrity

    anonymous = torch.randn(512, 1024)
    before = anonymous.clone()
    integrity._page_out(anonymous)
    assert torch.equal(anonymous, before)
    path = tmp_path / "table.bin"
    path.write_bytes(before.numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=before.numel(), dtype=torch.float32).view_as(before)
    assert torch.equal(mapped, before)
    integrity._page_out(mapped)
    assert torch.equal(mapped, before)
    folder = str(tiny_checkpoint("gpt_oss"))
    checked, unchecked = wb.load(folder, preset="cpu"), wb.load(folder, preset="cpu", check_weights=False)
    assert integrity._lookup_only_table(checked.model) is checked.model.get_input_embeddings().weight  # untied here
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        assert torch.equal(checked.model(input_ids=ids).logits, unchecked.model(input_ids=ids).logits)


def test_a_nan_scale_in_packed_mxfp4_experts_is_refused(tmp_path):
    # Packed MXFP4 expert bytes are all valid numbers; their E8M0 scales have one NaN code, 0xFF.
    folder = tmp_path / "nano-mxfp4"
    shutil.copytree(fixtures.nano_path("mxfp4"), folder)
    file = folder / "model.safetensors"
    length, header = _header(file)
    name = "model.layers.1.mlp.experts.down_proj_scales"
    start = 8 + length + header[name]["data_offsets"][0]
    _overwrite(file, start + 10, b"\xff" * 3)
    with pytest.raises(WeightsFileError) as e:
        wb.load(str(folder), preset="mxfp4")
    assert name in str(e.value) and "3 of" in str(e.value) and str(file) in str(e.value)


@pytest.mark.parametrize("preset", ["int8", "nf4"])
def test_damage_in_a_weight_quantized_on_load_is_refused(nano_copy, preset):
    # bitsandbytes quantizes the bf16 weight as it loads and the NaN is gone from the model: the file is scanned.
    file = nano_copy / "model.safetensors"
    length, header = _header(file)
    name = "model.layers.1.self_attn.q_proj.weight"
    begin, end = header[name]["data_offsets"]
    _overwrite(file, 8 + length + begin, _noise(end - begin))
    with pytest.raises(WeightsFileError) as e:
        wb.load(str(nano_copy), preset=preset)
    assert name in str(e.value) and str(file) in str(e.value)


def test_bitsandbytes_int8_cast_warning_is_filtered(caplog):
    s = wb.load(str(fixtures.nano_path()), preset="int8")
    assert s.report.actual_quantization == "bnb-int8"
    with caplog.at_level(logging.WARNING):
        with torch.no_grad():
            s.model(torch.tensor([[3, 4, 5, 6]]))
    assert not [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]


# ---- traces ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nano_trace():
    s = wb.load(str(fixtures.nano_path()), preset="cpu")
    return s.trace("hello there, how are you")


def test_an_intact_trace_round_trips(nano_trace, tmp_path):
    path = nano_trace.save(tmp_path / "t.wbtrace")
    back = wb.Trace.load(path)
    assert back.tokens.ids == nano_trace.tokens.ids and "crc32" not in back.meta
    assert set(back._t) == set(nano_trace._t)
    assert all(torch.equal(back._t[k], v) for k, v in nano_trace._t.items())


def test_a_damaged_trace_is_refused_naming_the_tensor(nano_trace, tmp_path):
    path = nano_trace.save(tmp_path / "t.wbtrace")
    length, _ = _header(path)
    data_start = 8 + length
    middle = data_start + (path.stat().st_size - data_start) // 2
    _overwrite(path, middle, _noise(256))
    hit = _tensors_at(path, middle, middle + 256)
    assert hit
    with pytest.raises(TraceFileError, match="is damaged") as e:
        wb.Trace.load(path)
    assert repr(hit[0]) in str(e.value) and str(path) in str(e.value)


def test_a_trace_saved_before_checksums_still_loads(nano_trace, tmp_path):
    path = nano_trace.save(tmp_path / "t.wbtrace")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["workbench"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta["crc32"]
    old = tmp_path / "old.wbtrace"
    save_file(tensors, str(old), metadata={"workbench": json.dumps(meta)})
    back = wb.Trace.load(old)
    assert all(torch.equal(back._t[k], v) for k, v in nano_trace._t.items())
