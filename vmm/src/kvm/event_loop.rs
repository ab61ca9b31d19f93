//! The VM's one device event loop: an `event-manager` epoll loop on its own
//! thread, `beacon-events`, shared by every device that waits on file
//! descriptors (virtio queue notifications, TAPs, sockets, console input and
//! output).
//!
//! It starts with the VM and ends when [`EventLoop::stop`] writes its exit
//! eventfd; there is no polling timer, so an idle VM costs no wakeups.
//! Subscribers are added before the start directly and afterwards (hotplug)
//! through the manager's remote endpoint. Handlers must never block or sleep:
//! one stalled device would stall them all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, RemoteEndpoint, SubscriberOps,
};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::VmError;
use crate::seccomp::{SeccompMode, ThreadClass};

/// Anything the loop serves.
pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// Ends the loop when its eventfd is written.
struct ExitSubscriber {
    evt: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for ExitSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            // Without it the loop could not be ended; make the first turn end it.
            tracing::error!("cannot watch the event loop's exit eventfd: {e:?}");
            self.stop.store(true, Ordering::Release);
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stop.store(true, Ordering::Release);
    }
}

enum State {
    /// Built, subscribers being added.
    Ready(EventManager<Subscriber>),
    Running(JoinHandle<()>),
    Stopped,
}

/// The device event loop of one VM.
pub struct EventLoop {
    state: State,
    endpoint: RemoteEndpoint<Subscriber>,
    exit: EventFd,
    /// Set by the exit subscriber; the loop thread checks it after each turn.
    stop: Arc<AtomicBool>,
}

fn loop_err(what: &str) -> impl FnOnce(event_manager::Error) -> VmError + '_ {
    move |e| VmError::Device {
        device: "event loop".into(),
        reason: format!("{what}: {e:?}"),
    }
}

impl EventLoop {
    /// An epoll set with the exit subscriber in it; nothing runs yet.
    pub fn new() -> Result<Self, VmError> {
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(loop_err("creating the epoll set"))?;
        let exit = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(VmError::io("creating the event loop's exit eventfd"))?;
        let stop = Arc::new(AtomicBool::new(false));
        manager.add_subscriber(Box::new(ExitSubscriber {
            evt: exit
                .try_clone()
                .map_err(VmError::io("duplicating the exit eventfd"))?,
            stop: stop.clone(),
        }));
        let endpoint = manager.remote_endpoint();
        Ok(Self {
            state: State::Ready(manager),
            endpoint,
            exit,
            stop,
        })
    }

    /// Add a subscriber: directly before the loop runs, through the loop's
    /// thread afterwards (it then registers its fds on that thread).
    pub fn add(&mut self, subscriber: Subscriber) -> Result<(), VmError> {
        match &mut self.state {
            State::Ready(manager) => {
                manager.add_subscriber(subscriber);
                Ok(())
            }
            State::Running(_) => self
                .endpoint
                .call_blocking(move |ops| -> Result<(), event_manager::Error> {
                    ops.add_subscriber(subscriber);
                    Ok(())
                })
                .map_err(loop_err("adding a device to the running event loop")),
            State::Stopped => Err(VmError::WrongState {
                operation: "adding a device",
                expected: "running",
                actual: "ended",
            }),
        }
    }

    /// Start the loop on its own thread, which confines itself as
    /// `seccomp` says before it serves the first event.
    pub fn start(&mut self, seccomp: SeccompMode) -> Result<(), VmError> {
        let State::Ready(_) = &self.state else {
            return Err(VmError::WrongState {
                operation: "starting the event loop",
                expected: "created",
                actual: "started",
            });
        };
        let State::Ready(mut manager) = std::mem::replace(&mut self.state, State::Stopped) else {
            return Ok(());
        };
        let stop = self.stop.clone();
        let handle = std::thread::Builder::new()
            .name("beacon-events".into())
            .spawn(move || {
                crate::seccomp::confine_or_warn(ThreadClass::Events, seccomp);
                while !stop.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        tracing::error!("device event loop failed: {e:?}; devices stop");
                        break;
                    }
                }
                // The manager, and with it every subscriber and its fds, drops here.
            })
            .map_err(VmError::io("starting the device event loop thread"))?;
        self.state = State::Running(handle);
        Ok(())
    }

    /// End the loop and wait for its thread; idempotent.
    pub fn stop(&mut self) {
        if let State::Running(handle) = std::mem::replace(&mut self.state, State::Stopped) {
            if let Err(e) = self.exit.write(1) {
                tracing::error!("cannot signal the event loop to end: {e}");
            }
            if handle.join().is_err() {
                tracing::error!("the device event loop thread panicked");
            }
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Counts the times its eventfd fired.
    struct Counter {
        evt: EventFd,
        hits: Arc<Mutex<u32>>,
    }

    impl MutEventSubscriber for Counter {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).expect("add");
        }
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.evt.read();
            *beacon_common::lock(&self.hits) += 1;
        }
    }

    fn counter() -> (Subscriber, EventFd, Arc<Mutex<u32>>) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let hits = Arc::new(Mutex::new(0));
        let sub = Box::new(Counter {
            evt: evt.try_clone().expect("clone"),
            hits: hits.clone(),
        });
        (sub, evt, hits)
    }

    fn wait_for(hits: &Arc<Mutex<u32>>, n: u32) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while *beacon_common::lock(hits) < n {
            assert!(std::time::Instant::now() < deadline, "event not served");
            std::thread::yield_now();
        }
    }

    #[test]
    fn serves_subscribers_added_before_and_after_start_and_stops() {
        let mut el = EventLoop::new().expect("loop");
        let (before, evt_before, hits_before) = counter();
        el.add(before).expect("add before start");
        el.start(SeccompMode::default()).expect("start");
        evt_before.write(1).expect("fire");
        wait_for(&hits_before, 1);
        let (after, evt_after, hits_after) = counter();
        el.add(after).expect("add while running");
        evt_after.write(1).expect("fire");
        wait_for(&hits_after, 1);
        el.stop();
        el.stop();
        assert!(
            el.start(SeccompMode::default()).is_err(),
            "a stopped loop does not restart"
        );
        assert!(el.add(counter().0).is_err());
    }
}
