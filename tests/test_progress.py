"""What a person sees: one line per plate while it runs, a summary as it ends; Ray's chatter in the log."""
import io
import logging
import warnings

from microsnoop_ray.io.sources import SiteKey
from microsnoop_ray.pipeline.progress import PlateProgress, ray_output_to


def test_plate_lines_count_sites_cells_and_eta():
    now = [0.0]
    out = io.StringIO()
    progress = PlateProgress({"P1": 4, "P2": 1}, stream=out, live=False, every=10.0, clock=lambda: now[0])
    for t, key, cells in ((5, SiteKey("P1", "A01", 1), 10), (16, SiteKey("P1", "A01", 2), None),
                          (17, SiteKey("P1", "A02", 1), 20), (20, SiteKey("P1", "A02", 2), 30),
                          (24, SiteKey("P2", "B01", 1), 7)):
        now[0] = t
        progress.site_done(key, cells)
    lines = out.getvalue().splitlines()
    # the first site prints at once, the next lines at most every 10 s, and each plate ends with its summary
    assert lines[0] == "  P1: 1/4 sites, 10 cells, 2.0 cells/s, 0:00:05 elapsed, ETA 0:00:15"
    assert lines[1].startswith("  P1: 2/4 sites, 10 cells") and len(lines) == 4
    assert lines[2] == "  P1 done: 4 sites (1 skipped), 60 cells in 20.0 s (3.0 cells/s)"
    assert lines[3] == "  P2 done: 1 sites (0 skipped), 7 cells in 4.0 s (1.8 cells/s)"


def test_live_line_is_rewritten_in_place():
    out = io.StringIO()
    progress = PlateProgress({"P": 2}, stream=out, live=True, clock=iter([0.0, 1.0, 1.0, 2.0, 2.0]).__next__)
    progress.site_done(SiteKey("P", "A01", 1), 3)
    progress.site_done(SiteKey("P", "A01", 2), 3)
    assert out.getvalue().count("\r") == 2 and out.getvalue().endswith("cells/s)\n")


def test_ray_messages_go_to_the_log_file_not_the_terminal(tmp_path, capsys):
    import ray.data  # noqa: F401  (Ray Data configures its logger on import)

    terminal = io.StringIO()
    ray_logger = logging.getLogger("ray.data")
    stream = logging.StreamHandler(terminal)
    ray_logger.addHandler(stream)
    try:
        with ray_output_to(tmp_path / "logs" / "profile.log") as term:
            import os
            os.write(2, b"[E core_worker.cc] what Ray's C++ side prints\n")
            assert term.fileno() != 2
            ray_logger.warning("a Ray Data warning")
            warnings.warn("a deprecation from a dependency", DeprecationWarning)
            logging.getLogger("microsnoop_ray.pipeline").error("our own error")
        ray_logger.warning("after the job")
    finally:
        ray_logger.removeHandler(stream)
    text = (tmp_path / "logs" / "profile.log").read_text()
    assert "what Ray's C++ side prints" in text
    assert "a Ray Data warning" in text and "a deprecation from a dependency" in text and "our own error" in text
    assert "after the job" not in text
    assert terminal.getvalue() == "after the job\n"  # muted while the job ran, restored after it


def test_pictures_leave_the_callers_matplotlib_backend_alone(tmp_path):
    import matplotlib
    import numpy as np

    from microsnoop_ray.plots import draw_field

    matplotlib.use("svg")  # e.g. a notebook's or an application's own choice
    plane = np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)
    labels = np.zeros((64, 64), np.int32)
    labels[20:30, 20:30] = 1
    path = draw_field(plane, tmp_path / "qc.png", labels, title="field")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == "svg"
