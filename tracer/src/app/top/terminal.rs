//! The thin terminal part of `tracer top`: a guard that owns raw mode and the alternate screen
//! (left on drop, on error and on panic), the layout of a [`View`], and the keys.
use std::io::{self, Stdout};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};

use crate::app::top::model::View;

/// Raw mode or the alternate screen may be on: restoring once is enough (leaving the alternate
/// screen twice would move the cursor back over what was printed in between, a panic message).
static ENTERED: AtomicBool = AtomicBool::new(false);

/// Keys read per call at most, so that a flood of input cannot hold the event loop.
const MAX_KEYS_PER_POLL: usize = 64;

/// What the keys asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Input {
    pub quit: bool,
    pub next_sort: bool,
    /// The window changed size, or the screen must be drawn again.
    pub redraw: bool,
}

/// Raw mode and the alternate screen while it lives; the terminal as it was once dropped.
pub struct TerminalGuard {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl TerminalGuard {
    pub fn enter() -> anyhow::Result<TerminalGuard> {
        install_panic_hook();
        ENTERED.store(true, Ordering::SeqCst);
        let entered = (|| -> io::Result<Terminal<CrosstermBackend<Stdout>>> {
            enable_raw_mode()?;
            execute!(io::stdout(), EnterAlternateScreen)?;
            let mut terminal = Terminal::new(CrosstermBackend::new(io::stdout()))?;
            terminal.hide_cursor()?;
            terminal.clear()?;
            Ok(terminal)
        })();
        match entered {
            Ok(terminal) => Ok(TerminalGuard { terminal }),
            Err(e) => {
                restore();
                Err(e).context("setting up the terminal")
            }
        }
    }

    pub fn draw(&mut self, view: &View) -> anyhow::Result<()> {
        self.terminal
            .draw(|frame| render(frame, view))
            .context("drawing to the terminal")?;
        Ok(())
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Leaves the alternate screen and raw mode, shows the cursor; once.
fn restore() {
    if !ENTERED.swap(false, Ordering::SeqCst) {
        return;
    }
    let _ = disable_raw_mode();
    let _ = execute!(
        io::stdout(),
        LeaveAlternateScreen,
        ratatui::crossterm::cursor::Show
    );
}

/// On panic, the terminal is restored before the message is printed, so that it is readable.
fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

/// Takes the keys pressed since the last call, without waiting.
pub fn read_input() -> anyhow::Result<Input> {
    let mut input = Input::default();
    for _ in 0..MAX_KEYS_PER_POLL {
        if !event::poll(Duration::ZERO).context("reading the terminal")? {
            break;
        }
        match event::read().context("reading the terminal")? {
            Event::Key(key) if key.kind != KeyEventKind::Release => match key.code {
                KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc => input.quit = true,
                KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                    input.quit = true;
                }
                KeyCode::Char('s') | KeyCode::Char('S') => input.next_sort = !input.next_sort,
                _ => {}
            },
            Event::Resize(..) => input.redraw = true,
            _ => {}
        }
    }
    Ok(input)
}

fn render(frame: &mut ratatui::Frame<'_>, view: &View) {
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let summary_height = u16::try_from(view.summary.len()).unwrap_or(u16::MAX) + 2;
    let [title, summary, peers, findings] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(summary_height),
        Constraint::Min(5),
        Constraint::Percentage(40),
    ])
    .areas(frame.area());

    frame.render_widget(
        Paragraph::new(Span::styled(view.title.as_str(), bold)),
        title,
    );

    let lines: Vec<Line<'_>> = view.summary.iter().map(|l| Line::raw(l.as_str())).collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" now ")),
        summary,
    );

    let header = Row::new(view.peer_header.iter().map(String::as_str)).style(bold);
    let rows = view
        .peers
        .iter()
        .map(|row| Row::new(row.iter().map(String::as_str)));
    let widths = [
        // An IPv6 address takes up to 39 columns.
        Constraint::Length(39),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Length(12),
    ];
    frame.render_widget(
        Table::new(rows, widths).header(header).block(
            Block::default()
                .borders(Borders::ALL)
                .title(" TIME_WAIT by peer (ports used: share of ip_local_port_range) "),
        ),
        peers,
    );

    let width = usize::from(findings.width.saturating_sub(2));
    let lines: Vec<Line<'_>> = view
        .finding_lines(width)
        .into_iter()
        .map(|(strong, text)| {
            if strong {
                Line::styled(text, bold)
            } else {
                Line::raw(text)
            }
        })
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" findings ")),
        findings,
    );
}
