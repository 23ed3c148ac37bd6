//! Hub errors: [`Error`] for start-up and internal failures, [`ApiError`] for what an HTTP client
//! sees, in OpenAI's error shape (<https://platform.openai.com/docs/guides/error-codes>).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// What stops the hub or fails inside it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ledger failed.
    #[error("ledger: {0}")]
    Ledger(#[from] tessera_ledger::Error),
    /// The hub's own tables failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Binding or serving failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Bad configuration.
    #[error("config: {0}")]
    Config(String),
    /// A row of the hub's tables that cannot be read back.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The chain (JSON-RPC endpoint or contracts) failed.
    #[error("chain: {0}")]
    Chain(String),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error answered to an API client: `{"error": {"message", "type", "param", "code"}}` with
/// the HTTP status OpenAI uses for the same condition. Internal details are logged, never sent.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI error type (`invalid_request_error`, `authentication_error`, …).
    pub kind: &'static str,
    /// Machine-readable code.
    pub code: &'static str,
    /// The offending request field, if any.
    pub param: Option<&'static str>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code,
            param: None,
        }
    }

    /// 400: the request is malformed or invalid.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    /// 400 naming a field.
    pub fn invalid_param(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::invalid("invalid_value", message)
        }
    }

    /// 400 `unsupported_parameter`: a parameter that would change the result and that this hub
    /// does not implement (refused rather than silently ignored).
    pub fn unsupported_param(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::invalid("unsupported_parameter", message)
        }
    }

    /// 401: missing or unknown API key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            message,
        )
    }

    /// 401: a signed message failed its checks (signature, domain, expiry, replayed nonce).
    pub fn bad_signature(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_signature",
            message,
        )
    }

    /// 404: no provider serves the model.
    pub fn model_not_found(model: &str) -> Self {
        let message = format!("The model `{model}` does not exist or no provider serves it.");
        Self {
            param: Some("model"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                message,
            )
        }
    }

    /// 429 `insufficient_quota`, as OpenAI answers an exhausted balance.
    pub fn insufficient_quota(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            "insufficient_quota",
            message,
        )
    }

    /// 429 `rate_limit_exceeded`: a per-wallet rate or concurrency limit.
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "requests",
            "rate_limit_exceeded",
            message,
        )
    }

    /// Any status, in OpenAI's shape (404, 405, 413 from the router itself).
    pub fn status(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self::new(status, "invalid_request_error", code, message)
    }

    /// 503: no provider could take the job.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            code,
            message,
        )
    }

    /// 502: the provider failed after the job started.
    pub fn provider_failed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "provider_failed",
            message,
        )
    }

    /// 403: a development endpoint on a hub not started with `--dev`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            "forbidden",
            message,
        )
    }

    /// 500: an internal failure; the detail is logged, the client sees a generic message.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(%detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            "The hub had an internal error.",
        )
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_openais_shape_and_status() {
        let e = ApiError::model_not_found("gpt-17");
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        let body = e.body();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("gpt-17")));
        assert_eq!(
            ApiError::insufficient_quota("x").status,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            ApiError::internal("secret detail").body()["error"]["message"],
            "The hub had an internal error."
        );
    }
}
