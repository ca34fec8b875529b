//! The checksum of stored blocks and rebuild copies: crc32c (CRC-32/ISCSI,
//! the same function as the `crc32c` crate and the replica's on-disk
//! records), computed with the widest carry-less multiply the CPU offers.
//! Replicas check one for every block they store or return, so its speed
//! shows in every large I/O.

/// crc32c of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    // CRC-32/ISCSI is 32 bits wide; the crate returns it in a u64.
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(crc32c(b""), 0);
        // The CRC-32/ISCSI check value.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 4096]), ::crc32c::crc32c(&[0u8; 4096]));
    }

    proptest! {
        /// Same function as the `crc32c` crate (which wrote the records of
        /// existing stores) at any length and alignment.
        #[test]
        fn matches_the_crc32c_crate(data in proptest::collection::vec(any::<u8>(), 0..20_000), skip in 0usize..64) {
            let data = &data[skip.min(data.len())..];
            prop_assert_eq!(crc32c(data), ::crc32c::crc32c(data));
        }
    }
}
