//! A TCP relay on loopback in front of an upstream, for the soak and the
//! benchmark: it can go down (every connection, open or new, is dropped)
//! and come back, cap each connection's download rate (a CDN edge seen over
//! a long path), and cut connections after a number of bytes. It counts the
//! bytes it relays from upstream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

pub struct Relay {
    pub url: String,
    pub up: tokio::sync::watch::Sender<bool>,
    /// Bytes relayed from upstream to clients.
    pub bytes: Arc<AtomicU64>,
    /// Each entry cuts one future connection after that many bytes.
    pub cuts: Arc<Mutex<Vec<u64>>>,
}

impl Relay {
    /// Relays to `target`, each connection's download capped at `rate`
    /// bytes per second (`None`: uncapped).
    pub async fn start(target: SocketAddr, rate: Option<u64>) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (up, rx) = tokio::sync::watch::channel(true);
        let bytes = Arc::new(AtomicU64::new(0));
        let cuts: Arc<Mutex<Vec<u64>>> = Arc::default();
        let (counted, cut_list) = (bytes.clone(), cuts.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                let mut rx = rx.clone();
                if !*rx.borrow() {
                    continue; // dropped: the other side sees a reset
                }
                let (counted, cut_after) = (counted.clone(), cut_list.lock().unwrap().pop());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = pipe(client, server, rate, counted, cut_after) => {}
                        _ = rx.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Relay { url, up, bytes, cuts }
    }

    pub fn set_up(&self, up: bool) {
        let _ = self.up.send(up);
    }

    pub fn relayed(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
}

async fn pipe(client: TcpStream, server: TcpStream, rate: Option<u64>, counted: Arc<AtomicU64>, cut_after: Option<u64>) {
    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    let upward = async move {
        let _ = tokio::io::copy(&mut client_r, &mut server_w).await;
        let _ = server_w.shutdown().await;
    };
    let downward = async move {
        // The pace is kept from a mark: (when, bytes sent then).
        let mut mark = (Instant::now(), 0u64);
        let mut sent = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let n = match cut_after {
                Some(cut) if sent + n as u64 >= cut => (cut - sent) as usize,
                _ => n,
            };
            if client_w.write_all(&buf[..n]).await.is_err() {
                break;
            }
            sent += n as u64;
            counted.fetch_add(n as u64, Ordering::SeqCst);
            if cut_after.is_some_and(|c| sent >= c) {
                break; // cut: the client sees the body end early
            }
            if let Some(rate) = rate {
                let due = mark.0 + Duration::from_secs_f64((sent - mark.1) as f64 / rate as f64);
                if due + Duration::from_secs(1) < Instant::now() {
                    // Idle (a kept-alive connection between requests): no
                    // saved-up allowance, the pace starts again from here.
                    mark = (Instant::now(), sent);
                } else {
                    tokio::time::sleep_until(due).await;
                }
            }
        }
        let _ = client_w.shutdown().await;
    };
    tokio::join!(upward, downward);
}
