//! `make demo-down` stops the demo's processes one PID file at a time
//! (examples/demo-stop.sh): the traffic generator exits by itself after 15 minutes,
//! and its stale PID file must not leave the operator and the agents running.

use anyhow::ensure;
use shoal_tests::cluster::workspace_dir;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A process whose command line holds `word`, as the demo's processes hold theirs
/// (python's argv after `-c` is free, so the word is the script's first argument).
fn start_process_named(word: &str) -> anyhow::Result<Child> {
    Ok(Command::new("python3")
        .args(["-c", "import time; time.sleep(120)", word])
        .stdin(Stdio::null())
        .spawn()?)
}

fn running(pid: u32) -> bool {
    // A zombie (exited, not yet waited for) has no command line left.
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| !cmdline.is_empty())
}

#[test]
fn demo_down_stops_every_process_after_the_traffic_has_ended() -> anyhow::Result<()> {
    let demo = tempfile::tempdir()?;
    let write_pid =
        |file: &str, pid: u32| std::fs::write(demo.path().join(file), format!("{pid}\n"));

    // The traffic generator ran and exited by itself: its PID file is stale.
    let mut traffic = start_process_named("examples/traffic.py")?;
    write_pid("traffic.pid", traffic.id())?;
    traffic.kill()?;
    traffic.wait()?;
    let mut live = vec![
        (
            "operator.pid",
            start_process_named("target/debug/shoal-operator")?,
        ),
        ("model-server.pid", start_process_named("http.server")?),
        (
            "agent-store-0.pid",
            start_process_named("target/debug/shoal-agent")?,
        ),
        (
            "agent-store-1.pid",
            start_process_named("target/debug/shoal-agent")?,
        ),
    ];
    for (file, child) in &live {
        write_pid(file, child.id())?;
    }
    // A PID file whose PID now belongs to another program: left alone.
    let mut stranger = start_process_named("not-the-demo")?;
    write_pid("agent-store-2.pid", stranger.id())?;

    let output = Command::new(workspace_dir().join("examples/demo-stop.sh"))
        .arg(demo.path())
        .stdin(Stdio::null())
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    eprintln!(
        "demo-stop.sh:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success(),
        "demo-stop.sh failed: {}",
        output.status
    );

    // Reap the children so that a stopped one is gone from /proc.
    let deadline = Instant::now() + Duration::from_secs(10);
    for (file, child) in &mut live {
        while child.try_wait()?.is_none() {
            ensure!(
                Instant::now() < deadline,
                "{file}'s process {} still runs after demo-stop.sh:\n{stdout}",
                child.id()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    ensure!(
        running(stranger.id()),
        "a process the demo did not start was left alone"
    );
    stranger.kill()?;
    stranger.wait()?;

    for line in [
        "traffic: had already exited",
        "operator: stopped",
        "model-server: stopped",
        "agent-store-0: stopped",
        "agent-store-1: stopped",
        "agent-store-2: PID",
    ] {
        ensure!(
            stdout.contains(line),
            "demo-stop.sh reports {line:?}:\n{stdout}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(demo.path())?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name())
        .collect();
    ensure!(left.is_empty(), "every PID file is removed: {left:?}");
    Ok(())
}
