//! NSQ protocol error codes and the error a server sends in an error frame.

use std::fmt;

/// The `E_*` code that starts every NSQ error frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Invalid,
    BadProtocol,
    BadBody,
    BadTopic,
    BadChannel,
    BadMessage,
    PubFailed,
    MpubFailed,
    DpubFailed,
    SubFailed,
    FinFailed,
    ReqFailed,
    TouchFailed,
    IdentifyFailed,
    AuthFirst,
    AuthFailed,
    AuthDisabled,
    AuthError,
    Unauthorized,
}

impl ErrorCode {
    /// Every code, for tests and tables.
    pub const ALL: [ErrorCode; 19] = [
        ErrorCode::Invalid,
        ErrorCode::BadProtocol,
        ErrorCode::BadBody,
        ErrorCode::BadTopic,
        ErrorCode::BadChannel,
        ErrorCode::BadMessage,
        ErrorCode::PubFailed,
        ErrorCode::MpubFailed,
        ErrorCode::DpubFailed,
        ErrorCode::SubFailed,
        ErrorCode::FinFailed,
        ErrorCode::ReqFailed,
        ErrorCode::TouchFailed,
        ErrorCode::IdentifyFailed,
        ErrorCode::AuthFirst,
        ErrorCode::AuthFailed,
        ErrorCode::AuthDisabled,
        ErrorCode::AuthError,
        ErrorCode::Unauthorized,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Invalid => "E_INVALID",
            ErrorCode::BadProtocol => "E_BAD_PROTOCOL",
            ErrorCode::BadBody => "E_BAD_BODY",
            ErrorCode::BadTopic => "E_BAD_TOPIC",
            ErrorCode::BadChannel => "E_BAD_CHANNEL",
            ErrorCode::BadMessage => "E_BAD_MESSAGE",
            ErrorCode::PubFailed => "E_PUB_FAILED",
            ErrorCode::MpubFailed => "E_MPUB_FAILED",
            ErrorCode::DpubFailed => "E_DPUB_FAILED",
            ErrorCode::SubFailed => "E_SUB_FAILED",
            ErrorCode::FinFailed => "E_FIN_FAILED",
            ErrorCode::ReqFailed => "E_REQ_FAILED",
            ErrorCode::TouchFailed => "E_TOUCH_FAILED",
            ErrorCode::IdentifyFailed => "E_IDENTIFY_FAILED",
            ErrorCode::AuthFirst => "E_AUTH_FIRST",
            ErrorCode::AuthFailed => "E_AUTH_FAILED",
            ErrorCode::AuthDisabled => "E_AUTH_DISABLED",
            ErrorCode::AuthError => "E_AUTH_ERROR",
            ErrorCode::Unauthorized => "E_UNAUTHORIZED",
        }
    }

    /// Whether the server closes the connection after sending this error. nsqd keeps the
    /// connection only for the three in-flight lookup failures.
    pub fn is_fatal(self) -> bool {
        !matches!(
            self,
            ErrorCode::FinFailed | ErrorCode::ReqFailed | ErrorCode::TouchFailed
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error the server reports to a client: the frame body is `"<CODE> <text>"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {text}")]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub text: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
        }
    }

    pub fn invalid(text: impl Into<String>) -> Self {
        Self::new(ErrorCode::Invalid, text)
    }

    pub fn is_fatal(&self) -> bool {
        self.code.is_fatal()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_in_flight_failures_are_non_fatal() {
        let non_fatal: Vec<_> = ErrorCode::ALL
            .iter()
            .filter(|c| !c.is_fatal())
            .map(|c| c.as_str())
            .collect();
        assert_eq!(
            non_fatal,
            ["E_FIN_FAILED", "E_REQ_FAILED", "E_TOUCH_FAILED"]
        );
    }

    #[test]
    fn display_is_code_space_text() {
        let e = ProtocolError::new(ErrorCode::BadTopic, "PUB topic name \"a$b\" is not valid");
        assert_eq!(
            e.to_string(),
            "E_BAD_TOPIC PUB topic name \"a$b\" is not valid"
        );
    }
}
