//! Background read threads: a FIFO of jobs, served by `threads` std threads that run one
//! job function per item. A job that panics costs neither the thread nor the process.
//! Deduplication is the caller's: the store reserves a tensor in the cache before queuing
//! it, so a tensor already queued or in flight is never queued again, and a job whose read
//! a `get` took over meanwhile finds nothing left to do.

use std::collections::VecDeque;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

/// The work a read thread does for one queued item.
pub(crate) type Job<T> = Arc<dyn Fn(T) + Send + Sync>;

pub(crate) struct ReadPool<T> {
    queue: Arc<Queue<T>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

struct Queue<T> {
    state: Mutex<QueueState<T>>,
    /// Signals a new job or the closing of the pool.
    ready: Condvar,
}

struct QueueState<T> {
    jobs: VecDeque<T>,
    closed: bool,
}

impl<T: Send + 'static> ReadPool<T> {
    /// Starts `threads` threads serving queued items with `job`.
    pub fn start(threads: usize, job: Job<T>) -> io::Result<ReadPool<T>> {
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
        });
        let pool = ReadPool {
            queue,
            workers: Mutex::new(Vec::with_capacity(threads)),
        };
        for n in 0..threads {
            let (queue, job) = (Arc::clone(&pool.queue), Arc::clone(&job));
            let worker = std::thread::Builder::new()
                .name(format!("bigmodel-read-{n}"))
                .spawn(move || serve(&queue, &job))?;
            lock(&pool.workers).push(worker);
        }
        Ok(pool)
    }

    /// Whether any thread serves the queue (`read_threads` may be 0).
    pub fn has_threads(&self) -> bool {
        !lock(&self.workers).is_empty()
    }

    /// Queues `items` (FIFO) and returns at once. When no thread will ever run them (the
    /// pool has no threads or is closed) they come back, for the caller to cancel.
    pub fn submit(&self, items: Vec<T>) -> Result<(), Vec<T>> {
        if !self.has_threads() {
            return Err(items);
        }
        let mut state = lock(&self.queue.state);
        if state.closed {
            return Err(items);
        }
        state.jobs.extend(items);
        drop(state);
        self.queue.ready.notify_all();
        Ok(())
    }

    /// Lets running jobs finish, joins the threads, and returns the jobs that never ran
    /// (the caller cancels them). Idempotent.
    pub fn close(&self) -> Vec<T> {
        let never_ran = {
            let mut state = lock(&self.queue.state);
            state.closed = true;
            Vec::from(std::mem::take(&mut state.jobs))
        };
        self.queue.ready.notify_all();
        let workers = std::mem::take(&mut *lock(&self.workers));
        for worker in workers {
            // `serve` catches job panics, so a worker only ends by returning.
            let _ = worker.join();
        }
        never_ran
    }
}

impl<T> Drop for ReadPool<T> {
    fn drop(&mut self) {
        // Normally closed already (the store cancels what never ran); this only stops threads.
        lock(&self.queue.state).closed = true;
        self.queue.ready.notify_all();
    }
}

/// A read thread's loop: take the oldest job, run it, until the pool closes.
fn serve<T>(queue: &Queue<T>, job: &Job<T>) {
    while let Some(item) = next_job(queue) {
        // A panicking job has already released its slot (the job guards its own state);
        // catching here keeps the thread alive for the jobs behind it.
        let _ = catch_unwind(AssertUnwindSafe(|| job(item)));
    }
}

fn next_job<T>(queue: &Queue<T>) -> Option<T> {
    let mut state = lock(&queue.state);
    loop {
        if state.closed {
            return None;
        }
        if let Some(item) = state.jobs.pop_front() {
            return Some(item);
        }
        state = queue
            .ready
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// Locks ignoring poison: the queue's invariants hold between any two statements.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    fn wait_until(what: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !what() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn runs_every_submitted_slot_and_survives_panics() {
        let done = Arc::new(AtomicU64::new(0));
        let seen = Arc::clone(&done);
        let job: Job<u32> = Arc::new(move |slot| {
            if slot == 3 {
                panic!("job 3 fails");
            }
            seen.fetch_add(1 << slot, Ordering::SeqCst);
        });
        let pool = ReadPool::start(2, job).unwrap();
        assert!(pool.submit(vec![0, 1, 2, 3, 4]).is_ok());
        assert!(pool.submit(vec![5, 6, 7]).is_ok());
        wait_until(|| done.load(Ordering::SeqCst) == 0b1111_0111);
        assert!(pool.close().is_empty());
        assert_eq!(
            pool.submit(vec![0]),
            Err(vec![0]),
            "a closed pool returns work"
        );
    }

    #[test]
    fn a_pool_without_threads_returns_work() {
        let pool = ReadPool::start(0, Arc::new(|_: u32| {})).unwrap();
        assert_eq!(pool.submit(vec![1]), Err(vec![1]));
    }

    #[test]
    fn close_returns_the_jobs_that_never_ran() {
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let (started, job_started) = std::sync::mpsc::channel::<u32>();
        let gate = Mutex::new((gate, started));
        let pool = Arc::new(
            ReadPool::start(
                1,
                Arc::new(move |item: u32| {
                    let (gate, started) = &*lock(&gate);
                    started.send(item).unwrap();
                    let _ = gate.recv();
                }),
            )
            .unwrap(),
        );
        pool.submit(vec![1, 2, 3]).unwrap();
        assert_eq!(job_started.recv().unwrap(), 1); // the worker now blocks in job 1
        let closing = Arc::clone(&pool);
        let closer = std::thread::spawn(move || closing.close());
        wait_until(|| lock(&pool.queue.state).closed);
        release.send(()).unwrap();
        assert_eq!(closer.join().unwrap(), vec![2, 3]);
    }
}
