//! IMDS client configuration. (Being written.)
