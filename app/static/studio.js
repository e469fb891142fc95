// The studio's page script (loaded by app/hosting.py launch_kwargs): runs once when the page loads.
() => {
}
