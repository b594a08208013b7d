//! PEFT adapter files (todo)
