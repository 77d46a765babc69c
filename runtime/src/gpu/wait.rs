//! The blocking-versus-async seam of the GPU backend.
//!
//! Every submission, readback and error scope is written once as async code.
//! Natively the blocking API drives it with `pollster` after `device.poll`
//! has waited for the GPU, so the futures are ready when polled; in the browser
//! the same futures are awaited on the page's event loop (wasm-bindgen-futures)
//! and complete when WebGPU resolves its promises.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use crate::error::RuntimeError;

struct Slot<T> {
    value: Option<T>,
    /// The sender was dropped without sending (wgpu dropped the callback).
    closed: bool,
    waker: Option<Waker>,
}

/// The sending half, moved into a wgpu callback.
pub(crate) struct Sender<T>(Arc<Mutex<Slot<T>>>);

/// The receiving half: a future of `Some(value)`, or `None` when the sender
/// was dropped unsent.
pub(crate) struct Receiver<T>(Arc<Mutex<Slot<T>>>);

/// A one-value channel whose receiver is a future: how a wgpu callback
/// (`map_async`, `on_submitted_work_done`) becomes something to await.
pub(crate) fn oneshot<T>() -> (Sender<T>, Receiver<T>) {
    let slot = Arc::new(Mutex::new(Slot { value: None, closed: false, waker: None }));
    (Sender(slot.clone()), Receiver(slot))
}

fn lock<T>(slot: &Mutex<Slot<T>>) -> std::sync::MutexGuard<'_, Slot<T>> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T> Sender<T> {
    pub fn send(self, value: T) {
        let waker = {
            let mut s = lock(&self.0);
            s.value = Some(value);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut s = lock(&self.0);
            s.closed = true;
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Future for Receiver<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut s = lock(&self.0);
        if let Some(v) = s.value.take() {
            return Poll::Ready(Some(v));
        }
        if s.closed {
            return Poll::Ready(None);
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Waits for `rx`, whose callback fires once the device finishes the work
/// submitted so far. Natively `device.poll` blocks until then, so the future
/// is ready (or about to be, when another thread polling the same device runs
/// the callback); on the web it suspends until the browser runs the callback.
pub(crate) async fn settle<T>(device: &wgpu::Device, rx: Receiver<T>, what: &str) -> Result<T, RuntimeError> {
    #[cfg(not(target_arch = "wasm32"))]
    device
        .poll(wgpu::PollType::Wait { submission_index: None, timeout: Some(std::time::Duration::from_secs(300)) })
        .map_err(|e| RuntimeError::Gpu(format!("{what}: waiting for the device: {e}")))?;
    #[cfg(target_arch = "wasm32")]
    let _ = device;
    rx.await.ok_or_else(|| RuntimeError::Gpu(format!("{what}: the device dropped the callback")))
}

/// Runs an async GPU call to completion on native targets.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    pollster::block_on(f)
}

/// The blocking API's driver: natively [`block_on`]; in the browser nothing
/// may block the page's only thread, so the blocking API is an error there and
/// callers use the `_async` methods.
pub(crate) fn blocking<F: Future>(f: F) -> Result<F::Output, RuntimeError> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        Ok(block_on(f))
    }
    #[cfg(target_arch = "wasm32")]
    {
        drop(f);
        Err(RuntimeError::Gpu(
            "blocking GPU calls are not available in the browser; use the async methods (forward_async, generate_greedy_async)"
                .into(),
        ))
    }
}
