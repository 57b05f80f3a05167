//! A TCP proxy on 127.0.0.1 that can stall or slow down: while stalled it accepts
//! connections and reads what both sides send but forwards nothing, so every call
//! through it hangs (as behind a dead network link or an overloaded API server)
//! without the connection being refused or reset; with a latency it holds each
//! chunk that long before forwarding it. Used on a process's API-server calls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How often a stalled copy checks whether it may go on.
const STALL_POLL: Duration = Duration::from_millis(20);

/// A running proxy to one upstream address; stops when dropped.
pub struct StallProxy {
    addr: SocketAddr,
    stalled: Arc<AtomicBool>,
    latency_micros: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl StallProxy {
    /// Listens on a free 127.0.0.1 port and forwards each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<StallProxy> {
        let listener = TcpListener::bind(("127.0.0.1", crate::ports::free_port()?)).await?;
        let addr = listener.local_addr()?;
        let stalled = Arc::new(AtomicBool::new(false));
        let latency_micros = Arc::new(AtomicU64::new(0));
        let (flag, latency) = (stalled.clone(), latency_micros.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (flag, latency) = (flag.clone(), latency.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        copy(client_read, server_write, flag.clone(), latency.clone()),
                        copy(server_read, client_write, flag, latency),
                    );
                });
            }
        });
        Ok(StallProxy {
            addr,
            stalled,
            latency_micros,
            task,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on nothing is forwarded, on open connections and new ones.
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// Forwarding goes on where it stopped.
    pub fn resume(&self) {
        self.stalled.store(false, Ordering::SeqCst);
    }

    /// Holds every chunk `latency` before forwarding it, each way: a request and its
    /// answer take about twice that longer.
    pub fn set_latency(&self, latency: Duration) {
        self.latency_micros
            .store(latency.as_micros() as u64, Ordering::SeqCst);
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
    latency_micros: Arc<AtomicU64>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        while stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(STALL_POLL).await;
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        while stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(STALL_POLL).await;
        }
        let latency = latency_micros.load(Ordering::SeqCst);
        if latency > 0 {
            tokio::time::sleep(Duration::from_micros(latency)).await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
