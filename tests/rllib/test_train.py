"""bridges.rllib.train: whole-episode returns from chunked episodes (no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

from bridges.rllib.train import EPISODE_RETURNS_KEY, EpisodeReturns


class Logger:
    def __init__(self):
        self.values = []

    def log_value(self, key, value, reduce=None):
        assert key == EPISODE_RETURNS_KEY and reduce == "item_series"
        self.values.append(value)


def chunk(id_, ret, done):
    return SimpleNamespace(id_=id_, is_done=done, get_return=lambda: ret)


def test_episode_spanning_fragments_reports_its_whole_return():
    callback, logger = EpisodeReturns(), Logger()
    callback.on_episode_end(episode=chunk("a", 12.0, True), metrics_logger=logger)
    callback.on_sample_end(samples=[chunk("a", 12.0, True), chunk("b", 64.0, False)])
    callback.on_sample_end(samples=[chunk("b", 64.0, False)])  # b runs through a whole fragment
    callback.on_episode_end(episode=chunk("b", 30.0, True), metrics_logger=logger)
    assert logger.values == [12.0, 158.0]
