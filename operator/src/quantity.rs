//! Kubernetes resource quantities (`10Gi`, `500M`, `1.5e9`) as numbers, to compare volume sizes.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// The storage a claim (or a claim template) asks for.
pub fn requested_storage(claim: &PersistentVolumeClaim) -> Option<&Quantity> {
    claim
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
}

/// The value of a quantity, or `None` when it is not one.
pub fn bytes(quantity: &str) -> Option<f64> {
    let quantity = quantity.trim();
    let split = quantity
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        exponent => {
            let exponent = exponent.strip_prefix(['e', 'E'])?;
            10f64.powi(exponent.parse().ok()?)
        }
    };
    Some(number * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_decimal_and_exponent_suffixes() {
        assert_eq!(bytes("10Gi"), Some(10.0 * 1024.0 * 1024.0 * 1024.0));
        assert_eq!(bytes("1.5Ki"), Some(1536.0));
        assert_eq!(bytes("20G"), Some(20e9));
        assert_eq!(bytes("1e3"), Some(1000.0));
        assert_eq!(bytes("100"), Some(100.0));
        assert_eq!(bytes("500m"), Some(0.5));
        assert!(bytes("10Gi").expect("q") > bytes("10G").expect("q"));
        assert_eq!(bytes("ten"), None);
        assert_eq!(bytes("10Xi"), None);
    }
}
