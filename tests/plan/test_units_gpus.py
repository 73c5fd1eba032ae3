import pytest

from nvfp4kit.plan.gpus import GPUS, find_gpu
from nvfp4kit.plan.units import GiB, format_count, parse_bytes


@pytest.mark.parametrize(
    ("text", "value"),
    [("24GiB", 24 * GiB), ("80GB", 80 * 10**9), ("512MiB", 512 << 20), ("17.81GiB", int(17.81 * GiB)),
     ("24G", 24 * GiB), ("1000", 1000), (" 2 gb ", 2 * 10**9)],
)  # fmt: skip
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["", "lots", "24 parsecs", "-1GB"])
def test_parse_bytes_rejects_nonsense(bad):
    with pytest.raises(ValueError, match="24GiB"):
        parse_bytes(bad)


def test_format_count():
    assert [format_count(n) for n in (999, 11_636, 232_733, 1_650_000)] == ["999", "11.6K", "232.7K", "1.65M"]


def test_catalog_covers_the_cards_people_own():
    names = {g.name for g in GPUS}
    assert {
        "RTX 3090",
        "RTX 4090",
        "RTX 5090",
        "A100 40GB",
        "A100 80GB",
        "L4",
        "L40S",
        "H100 80GB",
        "H200",
        "B200",
    } == names
    assert {g.name for g in GPUS if g.native_fp4} == {"RTX 5090", "B200"}
    assert all(g.compute_capability >= (8, 0) for g in GPUS)


@pytest.mark.parametrize("alias", ["RTX 3090", "rtx3090", "3090", "Rtx-3090"])
def test_find_gpu_ignores_case_and_spacing(alias):
    gpu = find_gpu(alias)
    assert gpu.name == "RTX 3090" and gpu.memory_bytes == 24 * GiB and gpu.sm == "sm_86"


def test_unknown_gpu_lists_the_catalog():
    with pytest.raises(ValueError, match="H100 80GB"):
        find_gpu("voodoo2")
