//! Reaching the service: the shared front-end logic in [`capsem_core::service::autostart`].

pub use capsem_core::service::autostart::Target;
