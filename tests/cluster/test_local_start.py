"""Starting the local cluster on a loaded host: a Ray node whose GCS server misses its startup
window is recognised, what it left running is stopped, and the start is tried again."""

import subprocess
import sys
import textwrap


def test_a_gcs_server_that_misses_its_window_is_recognised_and_stopped():
    # Ray's own variable set to 0 makes the GCS server miss the window on any host: the error
    # must be one the cluster's start tries again after, and the GCS server that kept running
    # (a child of the driver, unknown to ray.shutdown) must be gone afterwards, also when the
    # start ran on a thread other than the main one.
    script = textwrap.dedent("""
        import logging, os, threading, time
        import ray
        from dspark.cluster import local
        os.environ[local._GCS_PORT_WAIT_ENV] = "0"

        def alive(session):
            left = []
            for pid in local._children(os.getpid()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        args = f.read().decode(errors="replace")
                    with open(f"/proc/{pid}/stat") as f:
                        state = f.read().rsplit(")", 1)[1].split()[0]
                except OSError:
                    continue
                if session in args and state != "Z":
                    left.append(args.split()[0])
            return left

        def check():
            try:
                ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.ERROR)
            except Exception as e:
                err = e
            else:
                raise SystemExit("ray.init started although the GCS port wait was 0")
            assert local._missed_startup_window(err), str(err)
            session = str(err).split("/")[-2]
            before = alive(session)
            assert any("gcs_server" in a for a in before), before
            ray.shutdown()
            local._stop_failed_node(err)
            deadline = time.monotonic() + 20
            while alive(session) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not alive(session), alive(session)

        # On the main thread, then on another (whose children /proc lists under that thread).
        check()
        failed = []
        def run():
            try:
                check()
            except BaseException as e:
                failed.append(e)
        t = threading.Thread(target=run)
        t.start()
        t.join()
        assert not failed, failed
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


def test_the_gcs_port_wait_is_set_for_the_start_only_and_an_operators_value_is_kept(monkeypatch):
    import os

    from dspark.cluster import local

    monkeypatch.delenv(local._GCS_PORT_WAIT_ENV, raising=False)
    with local._gcs_port_wait(local.GCS_PORT_WAIT_S):
        assert os.environ[local._GCS_PORT_WAIT_ENV] == str(local.GCS_PORT_WAIT_S)
    assert local._GCS_PORT_WAIT_ENV not in os.environ
    monkeypatch.setenv(local._GCS_PORT_WAIT_ENV, "7")
    with local._gcs_port_wait(local.GCS_PORT_WAIT_S):
        assert os.environ[local._GCS_PORT_WAIT_ENV] == "7"
    assert os.environ[local._GCS_PORT_WAIT_ENV] == "7"


def test_other_start_errors_are_not_tried_again():
    from dspark.cluster import local

    assert local._missed_startup_window(Exception("The current node timed out during startup."))
    assert not local._missed_startup_window(Exception("Timed out waiting for file /tmp/x/other_file"))
    assert not local._missed_startup_window(RuntimeError("address already in use"))
