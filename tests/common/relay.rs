//! A TCP relay on loopback in front of an upstream, for the soak and the
//! benchmark: it can go down (every connection, open or new, is dropped)
//! and come back, cap each connection's download rate (a CDN edge seen over
//! a long path), and cut connections after a number of bytes. It counts the
//! bytes it relays from upstream, and can note when given bytes (a layer's
//! first ones) first pass toward a client (`Tap`).

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
    pub tap: Tap,
}

/// Bytes to look for in what relays send clients, shared by relays: when
/// they first passed, counted from when the look began.
#[derive(Clone, Default)]
pub struct Tap(Arc<Mutex<Option<Look>>>);

struct Look {
    needle: Vec<u8>,
    since: std::time::Instant,
    seen: Option<Duration>,
}

impl Tap {
    /// Looks for `needle` from now on (the previous look ends).
    pub fn look_for(&self, needle: &[u8]) {
        *self.0.lock().unwrap() = Some(Look { needle: needle.to_vec(), since: std::time::Instant::now(), seen: None });
    }

    /// Seconds from `look_for` to the needle's first passing.
    pub fn seen(&self) -> Option<f64> {
        self.0.lock().unwrap().as_ref().and_then(|l| l.seen).map(|d| d.as_secs_f64())
    }

    /// Notes the needle if `window` holds it; the bytes kept for the next
    /// window (a needle across two reads).
    fn check(&self, carry: &mut Vec<u8>, data: &[u8]) {
        let mut look = self.0.lock().unwrap();
        let Some(l) = look.as_mut().filter(|l| l.seen.is_none() && !l.needle.is_empty()) else { return carry.clear() };
        carry.extend_from_slice(data);
        if carry.windows(l.needle.len()).any(|w| w == l.needle.as_slice()) {
            l.seen = Some(l.since.elapsed());
        }
        let keep = l.needle.len() - 1;
        if carry.len() > keep {
            carry.drain(..carry.len() - keep);
        }
    }
}

impl Relay {
    /// Relays to `target`, each connection's download capped at `rate`
    /// bytes per second (`None`: uncapped).
    pub async fn start(target: SocketAddr, rate: Option<u64>) -> Relay {
        Relay::start_tapped(target, rate, Tap::default()).await
    }

    /// `start`, noting what `tap` looks for.
    pub async fn start_tapped(target: SocketAddr, rate: Option<u64>, tap: Tap) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (up, rx) = tokio::sync::watch::channel(true);
        let bytes = Arc::new(AtomicU64::new(0));
        let cuts: Arc<Mutex<Vec<u64>>> = Arc::default();
        let (counted, cut_list, tapped) = (bytes.clone(), cuts.clone(), tap.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                let mut rx = rx.clone();
                if !*rx.borrow() {
                    continue; // dropped: the other side sees a reset
                }
                let (counted, cut_after, tap) = (counted.clone(), cut_list.lock().unwrap().pop(), tapped.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = pipe(client, server, rate, counted, cut_after, tap) => {}
                        _ = rx.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Relay { url, up, bytes, cuts, tap }
    }

    pub fn set_up(&self, up: bool) {
        let _ = self.up.send(up);
    }

    pub fn relayed(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
}

async fn pipe(client: TcpStream, server: TcpStream, rate: Option<u64>, counted: Arc<AtomicU64>, cut_after: Option<u64>, tap: Tap) {
    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    // A mirror's own copy through this relay is not a client's download.
    let (mirror_tx, mirror_rx) = tokio::sync::watch::channel(None::<bool>);
    let upward = async move {
        let mut first = vec![0u8; 16 * 1024];
        if let Ok(n) = client_r.read(&mut first).await
            && n > 0
        {
            let head = String::from_utf8_lossy(&first[..n]).to_ascii_lowercase();
            let _ = mirror_tx.send(Some(head.contains("user-agent: hubcap/")));
            if server_w.write_all(&first[..n]).await.is_ok() {
                let _ = tokio::io::copy(&mut client_r, &mut server_w).await;
            }
        }
        drop(mirror_tx);
        let _ = server_w.shutdown().await;
    };
    let downward = async move {
        // The pace is kept from a mark: (when, bytes sent then).
        let mut mark = (Instant::now(), 0u64);
        let mut sent = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        let mut carry = Vec::new();
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
            if *mirror_rx.borrow() == Some(false) {
                tap.check(&mut carry, &buf[..n]);
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
