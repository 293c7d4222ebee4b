"""bench/host_memory.py pauses free page reporting for a run and always puts it back."""

import pytest

from bench import host_memory


@pytest.fixture
def fake_host(tmp_path, monkeypatch):
    param = tmp_path / "page_reporting_order"
    param.write_text("9\n")
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(host_memory, "ORDER_PARAM", str(param))
    monkeypatch.setattr(host_memory, "PREFAULT_DIR", str(shm))
    monkeypatch.setattr(host_memory, "CHUNK", 1 << 20)
    monkeypatch.setattr(host_memory, "_mem_available", lambda: 8 << 20)
    return param, shm


def test_reporting_is_paused_inside_and_restored_after(fake_host):
    param, shm = fake_host
    with host_memory.kept_memory(want_bytes=3 << 20, reserve_bytes=4 << 20) as info:
        assert param.read_text() == str(host_memory.NO_REPORTING_ORDER)
        assert info["prefault_gib"] == round((3 << 20) / (1 << 30), 2)
        assert "9 -> 11" in info["page_reporting"]
        assert list(shm.iterdir()) == [], "the prefault file is removed"
    assert param.read_text() == "9"


def test_the_prefault_stays_within_available_memory_minus_the_reserve(fake_host):
    with host_memory.kept_memory(want_bytes=100 << 20, reserve_bytes=6 << 20) as info:
        assert info["prefault_gib"] == round((2 << 20) / (1 << 30), 2)  # 8 MiB available - 6 reserved


def test_restored_when_the_run_fails(fake_host):
    param, _ = fake_host
    with pytest.raises(RuntimeError):
        with host_memory.kept_memory(want_bytes=0):
            raise RuntimeError("fleet failed")
    assert param.read_text() == "9"


def test_a_host_without_page_reporting_is_left_alone(fake_host, tmp_path, monkeypatch):
    monkeypatch.setattr(host_memory, "ORDER_PARAM", str(tmp_path / "absent"))
    with host_memory.kept_memory(want_bytes=1 << 20) as info:
        assert info == {"page_reporting": "absent"}
    assert not (tmp_path / "absent").exists()


def test_smoke_runs_leave_the_host_alone_unless_told(fake_host):
    param, _ = fake_host
    assert host_memory.choice(None, smoke=True) == "as-is"
    assert host_memory.choice(None, smoke=False) == "keep"
    assert host_memory.choice("keep", smoke=True) == "keep"
    import contextlib

    with contextlib.ExitStack() as stack:
        info = host_memory.enter(stack, "as-is", want_bytes=1 << 20)
        assert param.read_text() == "9\n" and "as-is" in info["page_reporting"]
    with contextlib.ExitStack() as stack:
        host_memory.enter(stack, "keep", want_bytes=1 << 20)
        assert param.read_text() == str(host_memory.NO_REPORTING_ORDER)
    assert param.read_text() == "9"
