//! The one table of OCI error codes: each code registered once with its
//! HTTP status and default message, and `RegistryError`, the error a client
//! sees (code, message, and an internal cause kept for the server log).

use std::borrow::Cow;
use std::fmt;

macro_rules! error_codes {
    ($($variant:ident => ($code:literal, $status:literal, $message:literal)),+ $(,)?) => {
        /// Every OCI / distribution error code the mirror answers with,
        /// registered once with its HTTP status and default message.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum ErrorCode { $($variant),+ }

        impl ErrorCode {
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code),+ }
            }
            pub fn status(self) -> u16 {
                match self { $(ErrorCode::$variant => $status),+ }
            }
            pub fn message(self) -> &'static str {
                match self { $(ErrorCode::$variant => $message),+ }
            }
        }
    };
}

error_codes! {
    BlobUnknown => ("BLOB_UNKNOWN", 404, "blob unknown to registry"),
    DigestInvalid => ("DIGEST_INVALID", 400, "provided digest did not match uploaded content"),
    ManifestUnknown => ("MANIFEST_UNKNOWN", 404, "manifest unknown"),
    ManifestInvalid => ("MANIFEST_INVALID", 502, "manifest invalid"),
    NameInvalid => ("NAME_INVALID", 400, "invalid repository name"),
    NameUnknown => ("NAME_UNKNOWN", 404, "repository name not known to registry"),
    TagInvalid => ("TAG_INVALID", 400, "manifest tag did not match URI"),
    PaginationNumberInvalid => ("PAGINATION_NUMBER_INVALID", 400, "invalid number of results requested"),
    Unauthorized => ("UNAUTHORIZED", 401, "authentication required"),
    Denied => ("DENIED", 403, "requested access to the resource is denied"),
    Unsupported => ("UNSUPPORTED", 405, "the operation is unsupported"),
    TooManyRequests => ("TOOMANYREQUESTS", 429, "too many requests"),
    Unavailable => ("UNAVAILABLE", 503, "service unavailable"),
    Unknown => ("UNKNOWN", 500, "unknown error"),
}

/// An error the client will see: an OCI code plus a human message. `internal`
/// carries the cause for the server log (never sent to the client).
#[derive(Debug, Clone)]
pub struct RegistryError {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
    pub internal: Option<String>,
    /// Seconds the client should wait before retrying (429/503).
    pub retry_after: Option<u64>,
}

impl RegistryError {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        RegistryError { code, message: message.into(), internal: None, retry_after: None }
    }
    pub fn code(code: ErrorCode) -> Self {
        RegistryError::new(code, code.message())
    }
    pub fn with_internal(mut self, cause: impl fmt::Display) -> Self {
        self.internal = Some(cause.to_string());
        self
    }
    pub fn with_retry_after(mut self, secs: Option<u64>) -> Self {
        self.retry_after = secs;
        self
    }
    /// The OCI error body: `{"errors":[{"code","message","detail"}]}`.
    pub fn body(&self) -> String {
        serde_json::json!({
            "errors": [{ "code": self.code.as_str(), "message": self.message, "detail": null }]
        })
        .to_string()
    }
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)?;
        if let Some(i) = &self.internal {
            write!(f, " ({i})")?;
        }
        Ok(())
    }
}

impl std::error::Error for RegistryError {}
