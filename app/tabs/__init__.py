"""The studio's tabs, one module each. Every module's `build(ctx)` (ctx: app/context.py) lays out its tab inside
the caller's gr.Tabs, wires its events and returns what other tabs hand things to; app/ui.py assembles them."""
