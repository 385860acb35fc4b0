//! Test images built from scratch: real tar+gzip layers, configs with the
//! right diff_ids, image manifests (OCI and Docker schema 2) and multi-arch
//! indexes; and a pusher that publishes them to a real registry over HTTP.

use std::io::Write;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const ALL_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Deterministic incompressible bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut n = Noise::new(seed, len as u64);
    let mut out = Vec::with_capacity(len);
    while let Some(chunk) = n.next_chunk(1 << 20) {
        out.extend_from_slice(&chunk);
    }
    out
}

/// `noise` as a stream of chunks, for blobs too big to hold in memory. Each
/// 8-byte word is a function of the seed and its position, so any range can
/// be made without the bytes before it.
pub struct Noise {
    key: u64,
    /// Position of the next byte.
    at: u64,
    left: u64,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Noise {
    pub fn new(seed: u64, len: u64) -> Noise {
        Noise::range(seed, 0, len)
    }

    /// `len` bytes of `noise(.., seed)` from `offset` on.
    pub fn range(seed: u64, offset: u64, len: u64) -> Noise {
        Noise { key: splitmix(seed), at: offset, left: len }
    }

    /// The next chunk of up to `max` bytes, `None` at the end.
    pub fn next_chunk(&mut self, max: usize) -> Option<Bytes> {
        if self.left == 0 {
            return None;
        }
        let n = (max as u64).min(self.left) as usize;
        let (first, skip) = (self.at / 8, (self.at % 8) as usize);
        let mut out = Vec::with_capacity(n + 16);
        let mut word = first;
        while out.len() < n + skip {
            out.extend_from_slice(&splitmix(self.key ^ word.wrapping_mul(0xD1B5_4A32_D192_ED03)).to_le_bytes());
            word += 1;
        }
        let out = Bytes::from(out).slice(skip..skip + n);
        self.at += n as u64;
        self.left -= n as u64;
        Some(out)
    }
}

/// The digest of `noise(len, seed)`, computed without holding it.
pub fn noise_digest(len: u64, seed: u64) -> String {
    let mut h = Sha256::new();
    let mut n = Noise::new(seed, len);
    while let Some(c) = n.next_chunk(1 << 20) {
        h.update(&c);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

#[derive(Clone, Copy, PartialEq)]
pub enum Format {
    Oci,
    Docker,
}

#[derive(Clone, Debug)]
pub struct Image {
    pub manifest: Bytes,
    pub media_type: String,
    pub digest: String,
    pub config: (String, Bytes),
    pub layers: Vec<(String, Bytes)>,
    pub arch: String,
}

impl Image {
    /// Config and layers, digest -> bytes.
    pub fn blobs(&self) -> Vec<(String, Bytes)> {
        std::iter::once(self.config.clone()).chain(self.layers.iter().cloned()).collect()
    }
}

#[derive(Clone, Debug)]
pub enum Published {
    Image(Image),
    Index { media_type: String, body: Bytes, children: Vec<Image> },
}

impl Published {
    pub fn images(&self) -> Vec<&Image> {
        match self {
            Published::Image(i) => vec![i],
            Published::Index { children, .. } => children.iter().collect(),
        }
    }
    pub fn top(&self) -> (String, Bytes) {
        match self {
            Published::Image(i) => (i.media_type.clone(), i.manifest.clone()),
            Published::Index { media_type, body, .. } => (media_type.clone(), body.clone()),
        }
    }
    pub fn digest(&self) -> String {
        sha256(&self.top().1)
    }
    /// Every blob of every image.
    pub fn all_blobs(&self) -> Vec<(String, Bytes)> {
        self.images().iter().flat_map(|i| i.blobs()).collect()
    }
}

/// A gzipped tar layer holding `files`; returns (gz bytes, diff_id).
pub fn layer(files: &[(String, Vec<u8>)]) -> (Bytes, String) {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, path, &data[..]).unwrap();
    }
    let raw = tar.into_inner().unwrap();
    let diff_id = sha256(&raw);
    // Big layers are noise anyway: store them uncompressed inside gzip.
    let level = if raw.len() > 1 << 20 { flate2::Compression::none() } else { flate2::Compression::fast() };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), level);
    gz.write_all(&raw).unwrap();
    (Bytes::from(gz.finish().unwrap()), diff_id)
}

/// An image whose layers hold the given files.
pub fn image(format: Format, arch: &str, layers: Vec<Vec<(String, Vec<u8>)>>) -> Image {
    let (config_mt, layer_mt, manifest_mt) = match format {
        Format::Oci => ("application/vnd.oci.image.config.v1+json", "application/vnd.oci.image.layer.v1.tar+gzip", OCI_MANIFEST),
        Format::Docker => {
            ("application/vnd.docker.container.image.v1+json", "application/vnd.docker.image.rootfs.diff.tar.gzip", DOCKER_MANIFEST)
        }
    };
    let built: Vec<(Bytes, String)> = layers.iter().map(|files| layer(files)).collect();
    let diff_ids: Vec<&String> = built.iter().map(|(_, d)| d).collect();
    let config = Bytes::from(
        serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": { "Cmd": ["/bin/true"] },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": built.iter().map(|_| serde_json::json!({"created_by": "hubcap test"})).collect::<Vec<_>>(),
        })
        .to_string(),
    );
    let config_digest = sha256(&config);
    let layers: Vec<(String, Bytes)> = built.into_iter().map(|(b, _)| (sha256(&b), b)).collect();
    let mut manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest_mt,
        "config": { "mediaType": config_mt, "digest": config_digest, "size": config.len() },
        "layers": layers.iter().map(|(d, b)| serde_json::json!({"mediaType": layer_mt, "digest": d, "size": b.len()})).collect::<Vec<_>>(),
    });
    if format == Format::Oci {
        // OCI manifests may omit mediaType; keep it, as most tools write it.
        manifest["mediaType"] = serde_json::json!(manifest_mt);
    }
    let manifest = Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap());
    Image {
        digest: sha256(&manifest),
        manifest,
        media_type: manifest_mt.to_owned(),
        config: (config_digest, config),
        layers,
        arch: arch.to_owned(),
    }
}

/// A small image with `n` layers, unique per `seed`.
pub fn small_image(format: Format, arch: &str, seed: u64, n: usize) -> Image {
    let layers = (0..n).map(|i| vec![(format!("layer{i}/data-{seed}.bin"), noise(4096 + i * 1000, seed * 31 + i as u64))]).collect();
    image(format, arch, layers)
}

/// `small_image` with its manifest padded by an annotation to about
/// `manifest_len` bytes (a hostile upstream's fat manifest).
pub fn fat_image(seed: u64, manifest_len: usize) -> Image {
    let mut img = small_image(Format::Oci, "amd64", seed, 1);
    let mut v: serde_json::Value = serde_json::from_slice(&img.manifest).unwrap();
    v["annotations"] = serde_json::json!({ "padding": "x".repeat(manifest_len), "seed": seed.to_string() });
    img.manifest = Bytes::from(serde_json::to_vec(&v).unwrap());
    img.digest = sha256(&img.manifest);
    img
}

/// A multi-arch index over `children`.
pub fn index(format: Format, children: Vec<Image>) -> Published {
    let mt = if format == Format::Oci { OCI_INDEX } else { DOCKER_LIST };
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": mt,
        "manifests": children.iter().map(|c| serde_json::json!({
            "mediaType": c.media_type, "digest": c.digest, "size": c.manifest.len(),
            "platform": { "architecture": c.arch, "os": "linux" },
        })).collect::<Vec<_>>(),
    });
    Published::Index { media_type: mt.to_owned(), body: Bytes::from(serde_json::to_vec_pretty(&body).unwrap()), children }
}

/// Publishes to a real registry (Debian's docker-registry) with the push API.
pub async fn push(registry: &str, repo: &str, tag: &str, published: &Published) {
    let http = reqwest::Client::new();
    for image in published.images() {
        for (digest, bytes) in image.blobs() {
            let start = http.post(format!("{registry}/v2/{repo}/blobs/uploads/")).send().await.unwrap();
            assert_eq!(start.status().as_u16(), 202, "start upload: {}", start.text().await.unwrap());
            let loc = start.headers()["location"].to_str().unwrap().to_owned();
            let loc = if loc.starts_with("http") { loc } else { format!("{registry}{loc}") };
            let sep = if loc.contains('?') { '&' } else { '?' };
            let put = http
                .put(format!("{loc}{sep}digest={digest}"))
                .header("content-type", "application/octet-stream")
                .body(bytes.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(put.status().as_u16(), 201, "put blob: {}", put.text().await.unwrap());
        }
        let r = http
            .put(format!("{registry}/v2/{repo}/manifests/{}", image.digest))
            .header("content-type", &image.media_type)
            .body(image.manifest.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "put manifest: {}", r.text().await.unwrap());
    }
    let (mt, body) = published.top();
    let r = http.put(format!("{registry}/v2/{repo}/manifests/{tag}")).header("content-type", mt).body(body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201, "put tag: {}", r.text().await.unwrap());
}
