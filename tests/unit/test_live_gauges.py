"""Under --workers, a worker's readiness reaches the summed scrape when it changes, not at
its next periodic copy: a scrape served by the other worker right after start-up must not
say 0. Run in a child process: prometheus_client picks its multiprocess storage at import."""

import subprocess
import sys
import textwrap


def run_worker(tmp_path, script: str) -> subprocess.CompletedProcess:
    """Run ``script`` as a worker would: a child process given a fresh PROMETHEUS_MULTIPROC_DIR
    (its argv[1]), since prometheus_client picks its multiprocess storage at import."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    result = subprocess.run([sys.executable, "-c", script, str(directory)], capture_output=True, text=True,
                            timeout=60, env={"PROMETHEUS_MULTIPROC_DIR": str(directory), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return result


def test_a_workers_readiness_is_copied_when_the_app_turns_ready(tmp_path):
    script = textwrap.dedent("""
        import sys
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector
        from runnel.apps import AppRegistry
        from runnel.metrics import Metrics

        class Idle:
            async def start(self): pass
            async def close(self): pass

        def ready(directory):
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=directory)
            return registry.get_sample_value("runnel_app_ready", {"app": "echo"})

        apps = AppRegistry()
        apps.add("echo", Idle())
        metrics = Metrics(apps, multiprocess_dir=sys.argv[1])
        metrics._live_gauges.refresh()  # the periodic copy, taken while the app loads
        print(ready(sys.argv[1]))
        apps._set_state("echo", "ready")  # no refresh after this
        print(ready(sys.argv[1]))
        apps._set_state("echo", "failed")
        print(ready(sys.argv[1]))
    """)
    result = run_worker(tmp_path, script)
    assert result.stdout.split() == ["0.0", "1.0", "0.0"]


def test_a_scrape_skips_a_metrics_file_another_worker_has_only_just_created(tmp_path):
    """prometheus_client fails a whole scrape (struct.error) on a worker's file that exists but
    is not yet sized; the scrape must answer with the other files' values instead."""
    script = textwrap.dedent("""
        import sys
        from runnel.apps import AppRegistry
        from runnel.metrics import Metrics

        class Idle:
            async def start(self): pass
            async def close(self): pass

        apps = AppRegistry()
        apps.add("echo", Idle())
        metrics = Metrics(apps, multiprocess_dir=sys.argv[1])
        metrics.generation_requests.labels("echo", "stop").inc(3)
        open(sys.argv[1] + "/counter_99999.db", "wb").close()  # a worker between create and size
        text = metrics.render().decode()
        print([line for line in text.splitlines() if line.startswith("runnel_generation_requests_total")])
    """)
    result = run_worker(tmp_path, script)
    assert 'finish_reason="stop"} 3.0' in result.stdout


def test_a_workers_folds_are_summed_as_counters(tmp_path):
    """An app's batching_stats() "folds" / "folded_rows" (the CTranslate2 scheduler's) reach the
    summed scrape as counters: each copy adds what grew since the last one."""
    script = textwrap.dedent("""
        import sys
        from runnel.apps import AppRegistry
        from runnel.metrics import Metrics

        class Folding:
            folds = 0
            async def start(self): pass
            async def close(self): pass
            def batching_stats(self):
                return {"waiting_rows": 0, "running_rows": 0, "batch_sizes": [0, 1], "folds": self.folds,
                        "folded_rows": 3 * self.folds}

        app = Folding()
        apps = AppRegistry()
        apps.add("ct2", app)
        metrics = Metrics(apps, multiprocess_dir=sys.argv[1])
        app.folds = 2
        metrics._live_gauges.refresh()
        app.folds = 5
        text = metrics.render().decode()
        print([line for line in text.splitlines() if line.startswith("runnel_generation_fold")])
    """)
    result = run_worker(tmp_path, script)
    assert 'runnel_generation_folds_total{app="ct2"} 5.0' in result.stdout
    assert 'runnel_generation_folded_rows_total{app="ct2"} 15.0' in result.stdout
