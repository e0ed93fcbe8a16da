// The overview's chart: sent, opens and clicks by day, drawn by uPlot from the JSON the page
// carries in <script type="application/json" id="chart-data"> (data, never executed).
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var holder = document.getElementById("chart");
  var source = document.getElementById("chart-data");
  if (!holder || !source || typeof uPlot === "undefined") return;
  var data = JSON.parse(source.textContent);
  var times = data.days.map(function (day) { return Date.parse(day + "T00:00:00Z") / 1000; });
  var series = [
    ["sent", "Sent", "#444444"],
    ["opens", "Opens", "#7aa6f0"],
    ["unique_opens", "Unique opens", "#0b57d0"],
    ["clicks", "Clicks", "#f0a36f"],
    ["unique_clicks", "Unique clicks", "#c2410c"]
  ];
  var options = {
    width: Math.max(320, holder.clientWidth || 700),
    height: 320,
    tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"); },
    // half a day either side, so a window of one day is drawn as that day, not as years
    scales: {
      x: { time: true, auto: false, range: [times[0] - 43200, times[times.length - 1] + 43200] },
      y: { range: function (u, min, max) { return [0, Math.max(1, max * 1.1)]; } }
    },
    series: [{}].concat(series.map(function (s) {
      return { label: s[1], stroke: s[2], width: 2, points: { show: true, size: 6 } };
    })),
    axes: [{}, { label: "per day" }]
  };
  var plot = new uPlot(options, [times].concat(series.map(function (s) { return data[s[0]]; })),
                       holder);
  holder.setAttribute("data-drawn", "true");
  window.addEventListener("resize", function () {
    plot.setSize({ width: Math.max(320, holder.clientWidth), height: 320 });
  });
});
