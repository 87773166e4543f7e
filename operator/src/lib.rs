pub mod crd;
pub mod children;
