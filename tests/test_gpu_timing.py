"""pytest-benchmark numbers are GPU device time on CUDA (``bench.timing.DeviceClock``).

CPU: fake CUDA events drive the clock through a real pytest-benchmark fixture (the stats must be exactly the event
times, whatever the host time). GPU (``gpu`` marker): the clock's median agrees with ``do_bench``'s.
"""
import time

import pytest
import torch

from vexpert_kernels.bench.timing import DeviceClock

pytest.importorskip("pytest_benchmark")


class _FakeEvent:
    now_ms = 0.0

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = _FakeEvent.now_ms

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return other.t - self.t


def test_device_clock_feeds_pytest_benchmark_the_event_times(benchmark, monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    gpu_ms = iter([4.0, 2.0, 3.0, 5.0, 1.0, 9.0])
    seen = []

    def fn():
        time.sleep(0.002)  # host time that must not count
        ms = next(gpu_ms)
        seen.append(ms)
        _FakeEvent.now_ms += ms

    clock = DeviceClock("cpu")  # no L2 flush buffer off CUDA
    benchmark._timer = clock
    benchmark.pedantic(clock.wrap(fn), rounds=5, iterations=1, warmup_rounds=1)
    assert seen == [4.0, 2.0, 3.0, 5.0, 1.0, 9.0]  # 1 warm-up round (4.0) + 5 measured; host sleep not counted
    st = benchmark.stats.stats
    assert st.rounds == 5 and st.median == pytest.approx(3.0e-3) and st.min == pytest.approx(1.0e-3)
    assert st.max == pytest.approx(9.0e-3) and clock.last_ms == 9.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_clock_agrees_with_do_bench():
    from triton.testing import do_bench
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    fn = lambda: a @ a  # noqa: E731
    clock = DeviceClock("cuda")
    run = clock.wrap(fn)
    run()
    times = []
    for _ in range(20):
        t0 = clock()
        run()
        times.append((clock() - t0) * 1e3)
    med = sorted(times)[len(times) // 2]
    ref = do_bench(fn, warmup=10, rep=50, return_mode="median")
    assert 0.7 * ref < med < 1.4 * ref, f"DeviceClock median {med:.4f} ms vs do_bench {ref:.4f} ms"
