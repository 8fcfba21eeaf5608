//! A forked child uses a store opened by its parent while the parent's threads were busy
//! with it: the child must neither deadlock on an inherited lock nor join threads that do
//! not exist in it, and must read correct bytes through a runtime of its own.

mod runtime_common;

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bigmodel_store::{Store, TensorBytes};
use runtime_common::{budget, build, Built, Kind, Spec};

const NAMES: [&str; 6] = ["v0", "v1", "z0", "z1", "m0", "m1"];

fn built() -> Built {
    let kinds = [
        Kind::View,
        Kind::View,
        Kind::Zstd,
        Kind::Zstd,
        Kind::Misaligned,
        Kind::Misaligned,
    ];
    let specs: Vec<Spec> = NAMES
        .iter()
        .zip(kinds)
        .map(|(n, k)| Spec(n, 40_000, k))
        .collect();
    build(&specs)
}

/// Keeps the parent's cache lock and read threads busy until `running` goes false.
fn hammer(store: &Store, running: &AtomicBool) {
    let mut turn = 0usize;
    while running.load(Ordering::Relaxed) {
        let name = NAMES[turn % NAMES.len()];
        store.prefetch(&[NAMES[(turn + 1) % NAMES.len()]]).unwrap();
        drop(store.get(name).unwrap());
        turn += 1;
    }
}

/// What the child checks. No panics and no printing through std's locks in here: either
/// could wait on a lock a parent thread held at the fork.
fn child_checks(
    busy: &Store,
    quiet: Store,
    built: &Built,
    inherited: TensorBytes,
) -> Result<(), &'static str> {
    if inherited.as_slice() != built.data["v0"].as_slice() {
        return Err("inherited bytes changed");
    }
    drop(inherited); // must not touch the parent's cache lock
    if busy.stats().hits != 0 {
        return Err("the child's runtime should start from zero");
    }
    for name in NAMES {
        let bytes = busy.get(name).map_err(|_| "get failed in the child")?;
        if bytes.as_slice() != built.data[name].as_slice() {
            return Err("wrong bytes in the child");
        }
    }
    // The quiet store's child runtime has read threads of its own: a prefetch completes.
    quiet
        .prefetch(&["z1"])
        .map_err(|_| "prefetch failed in the child")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while quiet.stats().bytes_read == 0 {
        if Instant::now() > deadline {
            return Err("the child's prefetch never ran");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let bytes = quiet
        .get("z1")
        .map_err(|_| "get failed on the quiet store")?;
    if bytes.as_slice() != built.data["z1"].as_slice() || quiet.stats().prefetch_hits != 1 {
        return Err("the quiet store did not serve its prefetch");
    }
    drop(bytes);
    drop(quiet); // joins only the threads of its own (child) runtime
    Ok(())
}

fn run_child(busy: &Store, quiet: Store, built: &Built, inherited: TensorBytes) -> ! {
    let code = match child_checks(busy, quiet, built, inherited) {
        Ok(()) => 0,
        Err(message) => {
            // SAFETY: write(2) on stderr with a valid buffer; no lock involved.
            unsafe { libc::write(2, message.as_ptr().cast(), message.len()) };
            1
        }
    };
    // SAFETY: ends the child at once, without running the parent's exit handlers.
    unsafe { libc::_exit(code) }
}

/// Waits for `pid` for up to 20 s; kills it and fails if it hangs.
fn wait_for_child(pid: libc::pid_t) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut status = 0;
    loop {
        // SAFETY: plain waitpid on our own child.
        let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if done == pid {
            assert!(
                libc::WIFEXITED(status),
                "child died abnormally (status {status})"
            );
            return libc::WEXITSTATUS(status);
        }
        if Instant::now() > deadline {
            // SAFETY: kill and reap our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("the forked child deadlocked");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn fork_rounds(busy: &Store, built: &Built) {
    for round in 0..10 {
        let quiet = built.open(budget(1 << 20, 1));
        quiet.prefetch(&["z0"]).unwrap();
        let inherited = busy.get("v0").unwrap();
        // SAFETY: the child only runs `run_child`, which ends with `_exit`.
        match unsafe { libc::fork() } {
            0 => run_child(busy, quiet, built, inherited),
            -1 => panic!("fork failed: {}", std::io::Error::last_os_error()),
            pid => assert_eq!(wait_for_child(pid), 0, "child of round {round} failed"),
        }
        assert!(inherited.as_slice() == built.data["v0"].as_slice());
    }
}

#[test]
fn a_forked_child_gets_a_runtime_of_its_own() {
    let built = built();
    let busy = built.open(budget(3 * 160_000, 2));
    let running = AtomicBool::new(true);
    let outcome = std::thread::scope(|scope| {
        scope.spawn(|| hammer(&busy, &running));
        let outcome = catch_unwind(AssertUnwindSafe(|| fork_rounds(&busy, &built)));
        running.store(false, Ordering::Relaxed); // even on failure, so the scope can end
        outcome
    });
    if let Err(failure) = outcome {
        resume_unwind(failure);
    }
    // The parent's runtime was untouched by its children.
    let stats = busy.stats();
    assert!(stats.hits + stats.misses > 10, "{stats:?}");
    assert_eq!(stats.pinned_bytes, 0);
}
