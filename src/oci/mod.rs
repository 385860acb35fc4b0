//! Registry vocabulary: repository names, references, digests, manifest media
//! types and content negotiation, repository and tag patterns, and the one
//! table of OCI error codes.
//!
//! Everything here is pure: no I/O, no HTTP framework, no storage. The router
//! parses requests into these types; the service and the backends pass them on.
//!
//! - `name`: digests, repository paths, references;
//! - `manifest`: media types, `Accept` negotiation, manifest parsing;
//! - `pattern`: repository and tag globs (access control and pins);
//! - `error`: the OCI error table and `RegistryError`.

mod error;
mod manifest;
mod name;
mod pattern;

pub use error::*;
pub use manifest::*;
pub use name::*;
pub use pattern::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_distribution_grammar() {
        for ok in ["alpine", "library/alpine", "a/b/c/d", "my-org/my_img", "a__b", "a.b", "a---b", "0/1"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Alpine", "a//b", "/a", "a/", "-a", "a-", "a___b", "a..b", "a/b c", "a_.b", &"a".repeat(256)] {
            assert_eq!(validate_name(bad).unwrap_err().code, ErrorCode::NameInvalid, "{bad}");
        }
    }

    #[test]
    fn registries_come_from_ns_or_a_host_like_first_segment() {
        let r = RepoPath::resolve("alpine", None).unwrap();
        assert_eq!(r.key(), "docker.io/library/alpine");
        let r = RepoPath::resolve("ghcr.io/org/img", None).unwrap();
        assert_eq!((r.registry.as_str(), r.name.as_str()), ("ghcr.io", "org/img"));
        let r = RepoPath::resolve("localhost:5000/x", None).unwrap();
        assert_eq!(r.registry, "localhost:5000");
        let r = RepoPath::resolve("alpine", Some("docker.io")).unwrap();
        assert_eq!(r.key(), "docker.io/library/alpine");
        let r = RepoPath::resolve("org/img", Some("quay.io")).unwrap();
        assert_eq!(r.key(), "quay.io/org/img");
        let r = RepoPath::resolve("index.docker.io/org/img", None).unwrap();
        assert_eq!(r.key(), "docker.io/org/img");
        // 255 characters with `library/`, as it is sent upstream.
        assert!(RepoPath::resolve(&"a".repeat(247), None).is_ok());
        assert_eq!(RepoPath::resolve(&"a".repeat(248), None).unwrap_err().code, ErrorCode::NameInvalid);
    }

    #[test]
    fn patterns_match_repository_keys() {
        let m = |p: &str, key: &str| RepoPattern::parse(p).unwrap().matches(key);
        assert!(m("docker.io/library/*", "docker.io/library/alpine"));
        assert!(m("docker.io/*/x", "docker.io/a/b/x"), "* crosses /");
        assert!(!m("docker.io/library/*", "docker.io/other/alpine"));
        assert!(m("*", "anything/at/all"));
        assert!(m("docker.io/o/a*b*c", "docker.io/o/aXbYc") && !m("docker.io/o/a*b*c", "docker.io/o/aXc"));
        assert!(m("library/*", "docker.io/library/alpine"), "no registry: Docker Hub");
        assert!(m("ghcr.io/acme/*", "ghcr.io/acme/tool") && m("localhost:5000/x", "localhost:5000/x"));
        assert!(m("*/x", "ghcr.io/x") && !m("ghcr.io/acme/*", "GHCR.io/acme/tool"));
        assert!(m("ghcr.io/acme/tool?", "ghcr.io/acme/tool2") && !m("ghcr.io/acme/tool?", "ghcr.io/acme/tool"), "? is one character");
        assert_eq!(format!("{:?}", RepoPattern::parse(" library/* ").unwrap()), r#""docker.io/library/*""#);
        // A wildcard on Docker Hub's first level means every repository there.
        assert!(m("docker.io/*", "docker.io/library/alpine") && m("docker.io/*", "docker.io/acme/secret"));
        assert!(m("*", "docker.io/acme/secret") && m("redis*", "docker.io/library/redis") && m("redis*", "docker.io/redisorg/x"));
        // Uppercase never matches a name: refused, with the fix.
        let e = RepoPattern::parse("Acme/Secret").unwrap_err();
        assert!(e.contains("lowercase") && e.contains("acme/secret"), "{e}");
        assert!(RepoPattern::parse("GHCR.IO/acme/*").is_ok(), "a registry's case does not matter");
        // Normalised exactly as names are: an official image's short name,
        // Docker Hub's other spellings.
        assert!(m("good", "docker.io/library/good") && !m("good", "docker.io/good"), "`good` is library/good");
        assert!(m("alp*", "docker.io/library/alpine"));
        assert!(m("index.docker.io/good", "docker.io/library/good") && m("docker.io/good", "docker.io/library/good"));
        assert!(m("GHCR.IO/acme/*", "ghcr.io/acme/tool"), "registries are case-insensitive");
        for (pattern, name) in [("good", "good"), ("org/app", "org/app"), ("docker.io/x", "x"), ("ghcr.io/o/x", "ghcr.io/o/x")] {
            let key = RepoPath::resolve(name, None).unwrap().key();
            assert!(m(pattern, &key), "{pattern} matches the name {name} ({key})");
        }
        assert!(Glob::new("3.*").matches("3.20") && !Glob::new("3.*").matches("edge") && Glob::new("v?").matches("v1"));
    }

    #[test]
    fn digests_are_sha256_lowercase_hex() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert_eq!(Digest::parse(&good).unwrap().hex(), "a".repeat(64));
        for bad in ["sha256:abc", "sha256", &format!("sha256:{}", "A".repeat(64)), "SHA256:00", ":00"] {
            assert_eq!(Digest::parse(bad).unwrap_err().code, ErrorCode::DigestInvalid, "{bad}");
        }
        let e = Digest::parse(&format!("sha512:{}", "a".repeat(128))).unwrap_err();
        assert!(e.message.contains("unsupported digest algorithm"));
    }

    #[test]
    fn image_references_split_into_name_and_reference() {
        assert_eq!(split_image("alpine"), ("alpine", "latest"));
        assert_eq!(split_image("library/alpine:3.20"), ("library/alpine", "3.20"));
        assert_eq!(split_image("localhost:5000/x"), ("localhost:5000/x", "latest"));
        assert_eq!(split_image("localhost:5000/x:1"), ("localhost:5000/x", "1"));
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(split_image(&format!("ghcr.io/o/i@{d}")), ("ghcr.io/o/i", d.as_str()));
    }

    #[test]
    fn tags_and_digests_are_told_apart() {
        assert_eq!(Reference::parse("v1.2-rc_3").unwrap(), Reference::Tag("v1.2-rc_3".into()));
        assert!(matches!(Reference::parse(&format!("sha256:{}", "0".repeat(64))).unwrap(), Reference::Digest(_)));
        assert_eq!(Reference::parse(".hidden").unwrap_err().code, ErrorCode::TagInvalid);
        assert_eq!(Reference::parse(&"t".repeat(129)).unwrap_err().code, ErrorCode::TagInvalid);
    }

    #[test]
    fn accept_headers_are_negotiated() {
        let a = Accept::parse([format!("{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.5").as_str()]);
        assert!(a.accepts(DOCKER_MANIFEST) && a.accepts(OCI_MANIFEST));
        assert!(!a.accepts(OCI_INDEX));
        assert!(!a.is_all());
        assert_eq!(a.key(), format!("{OCI_MANIFEST},{DOCKER_MANIFEST}"));
        let refused = Accept::parse([format!("{OCI_INDEX};q=0, {OCI_MANIFEST}").as_str()]);
        assert!(!refused.accepts(OCI_INDEX));
        assert!(Accept::parse([]).accepts(OCI_INDEX));
        assert!(Accept::parse(["*/*"]).is_all());
        let all = Accept::parse(MANIFEST_TYPES);
        assert!(all.is_all());
        assert_eq!(all.key(), "");
    }

    #[test]
    fn manifests_list_what_they_reference() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}}]}}"#,
            d('a'),
            d('b')
        );
        let info = parse_manifest(body.as_bytes(), Some("application/octet-stream")).unwrap();
        assert_eq!(info.media_type, DOCKER_MANIFEST);
        assert_eq!(info.blobs.len(), 2);
        let index = format!(r#"{{"schemaVersion":2,"manifests":[{{"digest":"{}"}}]}}"#, d('c'));
        let info = parse_manifest(index.as_bytes(), Some(OCI_INDEX)).unwrap();
        assert!(info.is_index());
        assert_eq!(info.manifests.len(), 1);
        assert!(parse_manifest(b"not json", None).is_err());
        assert!(parse_manifest(br#"{"mediaType":"text/plain"}"#, None).is_err());
    }
}
