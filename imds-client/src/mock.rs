//! The IMDSv2 emulator. (Being written.)
