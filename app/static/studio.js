// The studio's page script (loaded by app/hosting.py launch_kwargs): runs once when the page loads.
() => {
  // Results are enlarged to fill their boxes (studio.css; the embedded model makes 64 px images): a picture of
  // at most 256 px in a result box is marked "studio-pixelated" when it loads, so it is enlarged crisp (nearest
  // neighbour); bigger ones keep the smooth filter. One capturing listener: load events do not bubble.
  if (!window.studioPixelsInstalled) {
    window.studioPixelsInstalled = true;
    document.addEventListener("load", (event) => {
      const img = event.target;
      if (!(img instanceof HTMLImageElement) || !img.closest(".studio-result")) return;
      img.classList.toggle("studio-pixelated", Math.max(img.naturalWidth, img.naturalHeight) <= 256);
    }, true);
  }
  // Ctrl+Enter (Cmd+Enter on macOS) in a text box runs its tab's main action, as in A1111: the first visible,
  // enabled primary button of the tab panel the box is in. One document-level listener, added once per page
  // (a second run of this script adds nothing), so listeners never pile up however many jobs run.
  if (!window.studioKeysInstalled) {
    window.studioKeysInstalled = true;
    document.addEventListener("keydown", (event) => {
      if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey) || event.isComposing) return;
      const box = event.target;
      if (!(box instanceof Element) || !box.matches("textarea, input[type=text], input:not([type])")) return;
      const panel = box.closest('[role="tabpanel"]');
      if (!panel) return;
      const run = Array.from(panel.querySelectorAll("button.primary"))
        .find((b) => !b.disabled && b.offsetParent !== null);
      if (!run) return;
      event.preventDefault();
      run.click();  // the box's value reached Gradio on its input events, before this key
    });
  }
}
