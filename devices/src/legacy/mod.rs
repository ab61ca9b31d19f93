//! The legacy PC devices every beacon VM has: a 16550 UART for the console, an
//! i8042 controller so the guest can reset the machine, and the boot-timer port
//! the guest init writes to mark "init reached".

pub mod boot_timer;
pub mod i8042;
pub mod serial;

pub use boot_timer::{BootTimer, BOOT_TIMER_MAGIC, BOOT_TIMER_PORT};
pub use i8042::I8042;
pub use serial::{EventFdTrigger, InputRoom, SerialDevice};
